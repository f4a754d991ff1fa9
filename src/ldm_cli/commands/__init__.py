"""The commands that are not trainers, one module each: `sample`, `reimagine` (with
`trajectory` pictures), `reconstruct`, `schedule_plot`, `evaluate`, and `demo` with its
`report`. Each is a function tests call directly; `ldm_cli.cli` only wraps them."""
