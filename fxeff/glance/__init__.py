"""Glance and focus (GFNet, NeurIPS'20): a downscaled glance of the whole image, then a few full-resolution
patches chosen from what was seen, with real early exit. See the README's quick start."""
from .crop import crop, crop_bilinear, pixel_corners
from .deploy import Parts, export_parts, run_parts
from .inference import Exits, Thresholds, anytime, calibrate, early_exit, step_macs, thresholds_for
from .evaluate import BudgetPoint, budget_curve, exit_steps, first_corners, item_coverage, load, save
from .model import GlanceFocus, steps_loss
from .plot import plot_curves, visualise
from .ppo import ppo_loss, train_ppo
from .split import Split, split_classifier
from .train import train

__all__ = ["crop", "crop_bilinear", "pixel_corners", "Split", "split_classifier", "GlanceFocus", "steps_loss",
           "Exits", "Thresholds", "early_exit", "anytime", "calibrate", "step_macs", "thresholds_for", "train",
           "BudgetPoint", "budget_curve", "exit_steps", "first_corners", "item_coverage", "save", "load",
           "visualise", "plot_curves", "train_ppo", "ppo_loss",
           "Parts", "export_parts", "run_parts"]
