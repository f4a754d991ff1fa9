"""Training: the shared Accelerate loop (`loop`) and the two tasks it runs (`vae_task`,
`denoiser_task`), with what a run keeps on disk — its folder (`rundir`), resumable
state (`state`), metrics log (`metrics`) and latent cache (`latent_cache`)."""
