"""What ``--model`` and ``--dataset`` accept, in words: the flags' help texts.

Torch-free on purpose: :mod:`byzsgd.config` builds every parser from these, and ``--help``
(or a launching machine without torch, ``scripts/run_exp.sh``) must not import torch.
``tests/test_models.py`` / ``tests/test_data.py`` check that :func:`model_help` and
:func:`dataset_help` name every registered model and dataset.
"""
from __future__ import annotations

#: inputs whose both sides reach this many pixels are "ImageNet-sized" (the CIFAR networks
#: then take their ImageNet stem; :mod:`byzsgd.learning.models.common`)
LARGE_SIDE = 96

#: the built-in models whose outputs are log-probabilities (the right input of ``nll``); every
#: other one outputs logits, which ``nll`` alone does not normalise
LOG_PROB_MODELS = frozenset({"convnet", "linear"})


def loss_model_mismatch(model: str, loss: str) -> str | None:
    """Why ``loss`` does not fit ``model``'s outputs, or None.  ``nll`` on logits is unbounded
    (it rewards the true class's logit without pushing the others down): such a run trains
    badly without any error, so it is worth a warning."""
    if loss.strip().lower().replace("_", "-") not in ("nll", "nllloss", "nll-loss"):
        return None
    name = model.strip().lower()
    if name in LOG_PROB_MODELS:
        return None
    return (f"--loss nll expects log-probabilities, and --model {model} outputs logits: "
            f"use --loss cross-entropy (Garfield's CIFAR runs do)")


def model_help() -> str:
    """The ``--model`` help text: every built-in name and what it is."""
    return ("convnet (MNIST), cifarnet, cnn; CIFAR-sized, any channels, torchvision's form on "
            f"inputs >= {LARGE_SIDE}px: resnet18, preactresnet18, senet18, resnext29, "
            "densenet121, dpn92, googlenet, mobilenet, mobilenetv2, shufflenetg2, "
            "efficientnetb0, regnetx200; torchvision's (3 channels): resnet34, resnet50, "
            "resnet152, vgg16, vgg19, inception (>= 75px); linear (logistic regression, for "
            "protocol benchmarks); or torchvision:<name>")


def dataset_help() -> str:
    """The ``--dataset`` help text."""
    return ("mnist, fashion-mnist, cifar10, cifar100 (<data_root>/cifar-10-batches-py/, "
            "cifar-100-python/), imagenet[:size] (<data_root>/imagenet/{train,val}/<class>/*.JPEG, "
            "decoded lazily, default size 224) or synthetic:CxHxW:K")
