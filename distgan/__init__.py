"""distgan: a distributed GAN trainer (Accelerate + webdataset + safetensors + W&B)."""

__version__ = "0.1.0"
