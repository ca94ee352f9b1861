"""The three ToonCrafter training stages; each module has its config, the step module the loop calls
(`forward(batch) -> losses`), and `build(model, run, models_dir) -> Stage`."""
