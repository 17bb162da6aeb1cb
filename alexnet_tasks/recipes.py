"""The training recipes as plain data: what each one sets, and those settings in words for the form.

``alexnet_tasks.training.recipe.resolve_hyperparameters`` starts from these
defaults; the DAG's form and the README's params table word them with
``describe`` and ``figures``, so a figure is written here once. Imports
nothing heavy (no Keras), so the DAG's form is built from it at parse time.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Each recipe's settings beyond Hyperparameters' defaults (alexnet_tasks.training.recipe).
RECIPE_DEFAULTS: dict[str, dict[str, Any]] = {
    # The tutorial exactly: plain SGD, constant rate, no augmentation, no XLA.
    "reference": dict(epochs=50, batch_size=32, learning_rate=0.001),
    "fast": dict(
        epochs=30,
        batch_size=128,  # twice the steps of 256 per epoch: +6 points at 3 epochs (docs/performance.md, the sweep)
        learning_rate=0.04,
        momentum=0.9,
        nesterov=True,
        weight_decay=5e-4,
        label_smoothing=0.1,
        warmup_epochs=1.0,
        decay="cosine",
        augment=True,
        dropout=0.3,  # 0.5 regularizes too much for runs of 3 to 15 epochs (docs/performance.md, ablation)
        jit_compile=True,  # where it pays: see alexnet_tasks.training.recipe.xla_pays
    ),
}
RECIPES = tuple(RECIPE_DEFAULTS)
# How evaluate predicts when the param test_time_augmentation is "recipe".
RECIPE_TEST_TIME_AUGMENTATION = {"reference": "none", "fast": "flip"}

# How ``describe`` words a setting: a format for its value (``{s}``: the plural's s), the words for a
# true boolean, or the words for each value.
_WORDS = {
    "epochs": "{} epoch{s}",
    "batch_size": "batch {}",
    "learning_rate": "learning rate {}",
    "momentum": "momentum {}",
    "nesterov": "Nesterov",
    "weight_decay": "weight decay {}",
    "label_smoothing": "label smoothing {}",
    "warmup_epochs": "{} warm-up epoch{s}",
    "decay": "{} decay",
    "augment": "flip and shift augmentation",
    "dropout": "dropout {}",
    "jit_compile": "XLA where it pays",
    "test_time_augmentation": {"none": "", "flip": "flip-averaged test predictions",
                               "flip_shift": "test predictions averaged over 10 flipped and shifted views"},
}


def figure(value: Any) -> str:
    """A setting's value as the form shows it: ``0.0005``, ``1``, ``cosine``."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return repr(value) if isinstance(value, float) else str(value)


def describe(settings: Mapping[str, Any]) -> str:
    """Recipe settings in words, in their order: ``"30 epochs, batch 128, ..., dropout 0.3"``.

    A true boolean is named (``augment`` -> ``flip and shift augmentation``), a false
    one is prefixed with ``no``; a setting without words of its own is shown
    as ``name value``.
    """
    words = []
    for name, value in settings.items():
        plain = name.replace("_", " ")
        wording = _WORDS.get(name, plain if isinstance(value, bool) else plain + " {}")
        if isinstance(wording, dict):
            text = wording.get(value, f"{plain} {value}")
        elif isinstance(value, bool):
            text = wording if value else f"no {wording}"
        else:
            text = wording.format(figure(value), s="" if value == 1 else "s")
        if text:
            words.append(text)
    return ", ".join(words)


def figures(name: str) -> str:
    """Each recipe's default of one setting: ``figures("epochs")`` -> ``"reference 50, fast 30"``."""
    return ", ".join(f"{recipe} {figure(defaults[name])}" for recipe, defaults in RECIPE_DEFAULTS.items()
                     if name in defaults)
