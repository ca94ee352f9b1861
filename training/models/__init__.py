"""Networks of ToonCrafter, one file per component, each with a config dataclass and named presets."""
