"""A tiny-ViT training config for the on-disk digit dataset of the CLI tests."""

TINY_MODEL = {"name": "vit_tiny_patch16_224", "pretrained": False,
              "kwargs": {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}}


def tiny_config(dataset, output_dir, **train):
    """A training config dict for ``tiny_dataset`` (LoRA rank 2 + MetaPEFT, 2 epochs of batch 8)."""
    return {
        "model": TINY_MODEL,
        "peft": {"method": "lora", "rank": 2},
        "data": {"kind": "index", "root": str(dataset), "train": "train.txt", "test": "test.txt",
                 "split": str(dataset / "split.yaml"), "image_size": 16, "resize": 18},
        "train": {"epochs": 2, "batch_size": 8, "log_every": 1, "progress": False, "lr": 0.05, "meta_lr": 0.05,
                  **train},
        "output_dir": str(output_dir),
    }
