//! The BPF object built by `build.rs`, embedded in the binary: the tap
//! (fentry, kprobe) and its counting maps, nothing else. The replay,
//! benchmark and emitter programs are the testkit's (`testkit/ebpf`).

/// Tap programs plus the agent's maps.
pub static TAP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/verdict-tap"));

#[cfg(test)]
mod tests {
    use aya_obj::{Object, ProgramSection};
    use verdict_common::maps::{ENDPOINT_COUNTERS, FLOW_CONFIG, FLOW_TABLE, STATS, TAP_CONFIG, WORLD_PORTS};

    use super::TAP_OBJECT;

    /// What ships can only count what a hook saw: no tc (or any other)
    /// program that could be fed notifications, no benchmark or emitter map.
    #[test]
    fn the_shipped_object_holds_only_the_tap_and_its_counting_maps() {
        let object = Object::parse(TAP_OBJECT).expect("the embedded tap object parses");
        let mut programs: Vec<(&str, &ProgramSection)> =
            object.programs.iter().map(|(name, p)| (name.as_str(), &p.section)).collect();
        programs.sort_by_key(|(name, _)| *name);
        let names: Vec<&str> = programs.iter().map(|(name, _)| *name).collect();
        assert_eq!(names, ["tap_fentry", "tap_fentry_direct", "tap_kprobe"], "programs of the shipped object");
        for (name, section) in &programs {
            assert!(
                matches!(section, ProgramSection::FEntry { .. } | ProgramSection::KProbe),
                "{name} is a {section:?} program, not a tap"
            );
        }
        let mut maps: Vec<&str> = object.maps.keys().map(String::as_str).filter(|m| !m.starts_with('.')).collect();
        maps.sort_unstable();
        assert_eq!(
            maps,
            [ENDPOINT_COUNTERS, FLOW_CONFIG, FLOW_TABLE, STATS, TAP_CONFIG, WORLD_PORTS],
            "maps of the shipped object"
        );
    }
}
