"""The exported model files: the safetensors format with ldm's metadata (`format`) and
the VAE and denoiser bundles written to and loaded from it (`bundles`)."""
