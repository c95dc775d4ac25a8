"""The stable import path for model checkpoints named in DESIGN.md (`utils.checkpoint.save_model` /
`load_model`); the code lives in utils/checkpoints/model.py with the other on-disk formats."""
from utils.checkpoints.model import load_model, save_model  # noqa: F401
