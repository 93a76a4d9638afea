"""The benchmark, kept outside the package: `bench` (harness), `reference` (plain reference, test oracle),
`stream`, `clock` and `lockstep`."""
