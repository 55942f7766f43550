"""distgan: a distributed GAN trainer (Accelerate + webdataset + safetensors + W&B)."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """`distgan.load_generator` (distgan/api.py), imported on first use: `import distgan` stays light."""
    if name == "load_generator":
        from distgan.api import load_generator

        return load_generator
    raise AttributeError(f"module 'distgan' has no attribute '{name}'")
