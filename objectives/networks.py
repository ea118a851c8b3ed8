"""The study file's `model` reference turned into an `nn.Module`, from a plain-dict spec a checkpoint keeps.

References: `cnn` (the built-in `objectives.model.CNN`), `torchvision:NAME` (any classification model in
`torchvision.models`), `path/to/file.py:build` or `package.module:build` (the user's factory, called as
`build(num_classes=..., in_channels=..., dropout=..., **model_args)` and expected to return an `nn.Module`).

torchvision models are adapted to the data and the tuned dropout, the same way on every rebuild so a
checkpoint's state_dict always fits:

* `model_args.weights = "DEFAULT"` (or a weights name such as "IMAGENET1K_V1") loads pretrained weights from
  torch's hub cache (downloading them when the machine can) and replaces the final `nn.Linear` by a fresh one
  with `num_classes` outputs. Without `weights` the model starts from random weights.
* `in_channels != 3`: the first `nn.Conv2d` is replaced by one taking `in_channels` inputs; with pretrained
  weights its kernel starts as the pretrained kernel summed over the RGB inputs and shared equally between the
  new inputs (so a grey image gives the response of the same grey image in RGB).
* `model_args.small_input = true` (ResNet-family only, refused elsewhere): the CIFAR stem, `conv1` a 3x3
  stride-1 convolution and `maxpool` removed, so 32x32 images are not shrunk 4x before the first block.
  With pretrained weights that stem is trained from scratch.
* dropout goes into the classifier head: in the module holding the final `nn.Linear`, its own `nn.Dropout`
  layers get `p = dropout`; where it has none, the Linear becomes `nn.Sequential(nn.Dropout(p), linear)`.
  Where that lands (checked against torchvision 0.29):

  | family | final Linear | dropout |
  | --- | --- | --- |
  | resnet, resnext, wide_resnet | `fc` | added before `fc` |
  | mobilenet_v2, efficientnet, mnasnet | `classifier.1` | `classifier.0` set |
  | mobilenet_v3 | `classifier.3` | `classifier.2` set |
  | vgg | `classifier.6` | `classifier.2` and `classifier.5` set |
  | alexnet | `classifier.6` | `classifier.0` and `classifier.3` set |
  | googlenet, inception_v3 | `fc` | the model's `dropout` set (with `aux_logits = false`; refused without) |
  | convnext | `classifier.2` | added before it |
  | regnet, shufflenet | `fc` | added before `fc` |
  | densenet | `classifier` | added before `classifier` |
  | vit | `heads.head` | added before it |
  | swin, swin_v2 | `head` | added before `head` |
  | maxvit | `classifier.5` | added before it |
  | squeezenet | none (a Conv2d head) | refused: no Linear to put dropout before or to replace |

torchvision itself is imported only where a torchvision model is built: `hpo status`, `best`, `report` and the
other commands that read a study without training start about 1 s sooner (4.1 -> 3.0 s for `hpo status`), and a
training run of the built-in CNN skips it too (part of what torchvision costs is torch._dynamo, which an eager
trial no longer loads either: objectives/optimizer_update.py).
"""

from __future__ import annotations

import copy
import difflib
import importlib
import inspect
import os
import pickle
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

from objectives.errors import ModelError
from objectives.model import OPTIONAL_KEYS, SPEC_KEYS, build_model
from objectives.settings import TrainConfig
from objectives.user_code import import_file

FACTORY_SIGNATURE = "build(num_classes, in_channels, dropout, **model_args)"
RESERVED_ARGS = ("num_classes", "in_channels", "dropout")  # set from the data and the search, never model_args
RESNET_FAMILY = ("resnet", "resnext", "wide_resnet")
BASE_KEYS = ("model", "model_args", "num_classes", "in_channels", "image_size", "dropout", "class_names")
CNN_KEYS = ("widths", "blocks_per_stage", "activation")
DESIGN_SIZE = 224  # most torchvision models are designed for 224x224 images



def network_spec(
    cfg: TrainConfig, *, num_classes: int, in_channels: int, image_size: int, class_names: Sequence[str]
) -> dict[str, Any]:
    """Everything `build_network` needs, as plain values only, so a checkpoint loads with weights_only=True."""
    spec: dict[str, Any] = {
        "model": str(cfg.model),
        "model_args": copy.deepcopy(dict(cfg.model_args)),
        "num_classes": int(num_classes),
        "in_channels": int(in_channels),
        "image_size": int(image_size),
        "dropout": float(cfg.dropout),
        "class_names": [str(name) for name in class_names],
    }
    if cfg.model == "cnn":
        spec["widths"] = [int(w) for w in cfg.widths]
        spec["blocks_per_stage"] = int(cfg.blocks_per_stage)
        spec["activation"] = str(cfg.activation)
        if cfg.pool_first:  # only when set: the default order's spec stays what earlier checkpoints hold
            spec["pool_first"] = True
    return spec


def build_network(spec: Mapping[str, Any], *, pretrained: bool = True) -> nn.Module:
    """The architecture `spec` describes, with fresh (or pretrained) weights; the same state_dict keys and
    shapes every time, so a checkpoint's weights load into it. A legacy spec (exactly `SPEC_KEYS`) is a CNN.

    `pretrained=False` skips loading `model_args.weights`: for rebuilding a checkpoint, whose own weights
    replace them anyway, on a machine that may not have the pretrained file."""
    if "model" not in spec and set(spec) == set(SPEC_KEYS):
        return _cnn(dict(spec))
    reference = str(spec.get("model", ""))
    required = BASE_KEYS + (CNN_KEYS if reference == "cnn" else ())
    missing = [key for key in required if key not in spec]
    if missing:
        raise ModelError(
            f"the model spec with keys {sorted(spec)} is missing {missing}: it was not made by network_spec (or by a "
            "different version of it). Rebuild it from the study settings with network_spec."
        )
    if reference == "cnn":
        return _cnn({key: spec[key] for key in SPEC_KEYS + OPTIONAL_KEYS if key in spec})
    reserved = [key for key in RESERVED_ARGS if key in spec["model_args"]]
    if reserved:
        raise ModelError(
            f"model {reference!r}: model_args sets {reserved}, which the objective sets itself (num_classes and "
            "in_channels from the data, dropout from the search space or the dropout key). Remove them from "
            "model_args."
        )
    if reference.startswith("torchvision:"):
        return _torchvision_model(spec, pretrained=pretrained)
    return _user_model(spec)


def check_network(spec: Mapping[str, Any], example: Tensor) -> nn.Module:
    """`build_network(spec)` after one forward pass (no grad) on `example`, N >= 2 images on the device the
    module is moved to: proves it maps images to (N, num_classes) logits; returned in training mode.

    The pass is in evaluation mode, and for torchvision models in training mode too: googlenet and
    inception_v3 return their auxiliary classifiers' logits beside the main ones while training. A user's
    model is not run in training mode here, where its code would take the check for training (the training
    loop says so if it returns something else than logits there); after a training-mode pass BatchNorm
    statistics have moved, so train a fresh `build_network(spec)`, not this module."""
    model = build_network(spec).to(example.device)
    modes = (False, True) if str(spec.get("model", "")).startswith("torchvision:") else (False,)
    for training in modes:
        model.train(training)
        _check_output(model, spec, example, training)
    model.train()
    return model


def _check_output(model: nn.Module, spec: Mapping[str, Any], example: Tensor, training: bool) -> None:
    reference = str(spec.get("model", "cnn"))
    shape = tuple(example.shape)
    expected = (shape[0], int(spec["num_classes"]))
    mode = " in training mode" if training else ""
    try:
        with torch.no_grad():
            output = model(example)
    except Exception as exc:  # any failure inside the user's or torchvision's forward is reported, not raised
        hint = _channels_hint(model, shape) or _small_image_hint(reference, shape)
        raise ModelError(
            f"model {reference!r} fails{mode} on a {shape} batch of images: {type(exc).__name__}: {exc}"
            f"{_where_raised(exc, reference)}.{hint}"
        ) from exc
    if not isinstance(output, Tensor):
        aux = any(hasattr(output, name) for name in ("aux_logits", "aux_logits1", "aux_logits2"))
        hint = (" It returns its auxiliary classifiers' logits beside the main ones: set model_args.aux_logits = "
                "false." if aux else " Make forward() return the logits tensor only.")
        raise ModelError(
            f"model {reference!r} returns a value of type {type(output).__name__}{mode} for a {shape} batch; "
            f"expected a tensor of {expected} logits (num_classes = {expected[1]}).{hint}"
        )
    if tuple(output.shape) != expected:
        raise ModelError(
            f"model {reference!r} maps a {shape} batch to {tuple(output.shape)}{mode}; expected {expected} logits "
            f"(num_classes = {expected[1]}). Make the model's last layer output num_classes values per image."
        )


def _cnn(spec: dict[str, Any]) -> nn.Module:
    try:
        return build_model(spec)
    except ValueError as exc:
        raise ModelError(f"model 'cnn': {exc}. Rebuild the spec from the study settings with network_spec.") from exc


def _channels_hint(model: nn.Module, shape: tuple[int, ...]) -> str:
    """The fix when the model's first convolution takes another number of channels than the images have."""
    first = next(((name, m) for name, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    if first is None or len(shape) != 4 or first[1].in_channels == shape[1]:
        return ""
    name, conv = first
    wanted = conv.in_channels
    setting = f", or set channels = {wanted} in [objective]" if wanted in (1, 3) else ""
    return (
        f" The images have {shape[1]} channel{'s' if shape[1] > 1 else ''} but the model's first convolution "
        f"({name}: {type(conv).__name__}) takes {wanted}: build it with the in_channels the factory is given "
        f"(nn.Conv2d(in_channels, ...)){setting}."
    )


def _where_raised(exc: BaseException, reference: str) -> str:
    """' (raised at my_models.py line 12, in forward: `...`)': the last line of the user's own code in the
    traceback (not torch's), so the message points into their file; "" for the built-in and torchvision models."""
    from search.failures import own_frames

    if reference == "cnn" or reference.startswith("torchvision:"):
        return ""
    own = [f for f in own_frames(exc) if f.filename != __file__]
    if not own:
        return ""
    frame = own[-1]
    code = f": `{frame.line}`" if frame.line else ""
    return f" (raised at {frame.filename} line {frame.lineno}, in {frame.name}{code})"


def _small_image_hint(reference: str, shape: tuple[int, ...]) -> str:
    """A hint for a forward failure on images smaller than torchvision's usual 224x224, else nothing."""
    if len(shape) != 4 or min(shape[2:]) >= DESIGN_SIZE or reference == "cnn":
        return ""
    size = f"{shape[2]}x{shape[3]}"
    if not reference.startswith("torchvision:"):
        return (
            f" The images are {size}: if the model needs larger ones, set image_size (dataset 'folder' or "
            f"'arrays'), or make the model work at {size}."
        )
    return (
        f" The images are {size}, smaller than the {DESIGN_SIZE}x{DESIGN_SIZE} most torchvision models are "
        "designed for: for a ResNet-family model set model_args.small_input = true, for a vit set "
        f"model_args.image_size = {shape[2]}, or use larger images (image_size = {DESIGN_SIZE} with dataset "
        "'folder' or 'arrays')."
    )


def _torchvision_model(spec: Mapping[str, Any], pretrained: bool = True) -> nn.Module:
    """torchvision's builder, then the pretrained head, small-input stem, input channels and dropout."""
    import torchvision  # here, not at the top: see the module's docstring

    reference = str(spec["model"])
    name = reference.partition(":")[2].strip().lower()
    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else f"the classification models are {', '.join(known)}."
        raise ModelError(
            f"model {reference!r}: torchvision {torchvision.__version__} has no classification model {name!r}; "
            f"{hint} Write model = 'torchvision:NAME' with one of those names."
        )
    args = dict(spec["model_args"])
    small_input = args.pop("small_input", False)
    if not isinstance(small_input, bool):
        raise ModelError(f"model {reference!r}: model_args.small_input must be true or false, not {small_input!r}.")
    if small_input and not name.startswith(RESNET_FAMILY):
        raise ModelError(
            f"model {reference!r}: model_args.small_input is for ResNet-family models only (resnet*, resnext*, "
            f"wide_resnet*), which it gives a 3x3 stride-1 stem for small images; {name} has no such stem. Remove "
            "small_input, choose a ResNet-family model, or use larger images."
        )
    weights = _weights(reference, name, args.pop("weights", None))
    if not pretrained:
        weights = None  # same shapes: the pretrained head is replaced by a num_classes one either way
    num_classes, in_channels = int(spec["num_classes"]), int(spec["in_channels"])
    if weights is None:
        model = _call_builder(reference, name, args, num_classes=num_classes, weights=None)
    else:
        model = _pretrained(reference, name, weights, args)
        path, linear = _final_linear(model, reference)
        _replace(model, path, nn.Linear(linear.in_features, num_classes, bias=linear.bias is not None))
    if small_input:
        stem = model.get_submodule("conv1")
        _replace(model, "conv1", nn.Conv2d(in_channels, stem.out_channels, 3, stride=1, padding=1, bias=False))
        _replace(model, "maxpool", nn.Identity())
    _adapt_input_channels(model, reference, in_channels, pretrained=weights is not None)
    _set_dropout(model, reference, float(spec["dropout"]))
    return model


def _weights(reference: str, name: str, value: Any) -> Any:
    """The weights enum member `value` names ("DEFAULT", "IMAGENET1K_V1", "ResNet18_Weights.IMAGENET1K_V1")."""
    if value is None:
        return None
    import torchvision

    enum = torchvision.models.get_model_weights(name)
    try:
        if not isinstance(value, str):
            raise KeyError(value)
        return enum.verify(value)
    except KeyError:
        raise ModelError(
            f"model {reference!r}: model_args.weights = {value!r} is not a weights name for {name}; use one of "
            f"{', '.join(enum.__members__)}, or drop weights to start from random weights."
        ) from None


def _call_builder(reference: str, name: str, args: dict[str, Any], **fixed: Any) -> nn.Module:
    """torchvision.models.get_model with `args`, its argument errors turned into a ModelError naming them."""
    import torchvision

    try:
        return torchvision.models.get_model(name, **fixed, **args)
    except TypeError as exc:
        named = [key for key in args if key in str(exc)] or sorted(args)
        raise ModelError(
            f"model {reference!r}: torchvision's {name} builder rejected model_args {named}: {exc}. Remove or fix "
            "them; the builder's keyword arguments are listed in torchvision's documentation for the model."
        ) from exc
    except (ValueError, AssertionError) as exc:
        raise ModelError(
            f"model {reference!r}: torchvision's {name} builder refused model_args {args}: "
            f"{type(exc).__name__}: {exc}. Fix those model_args."
        ) from exc


def _pretrained(reference: str, name: str, weights: Any, args: dict[str, Any]) -> nn.Module:
    """The model with pretrained weights from torch's hub cache, which torchvision fills by downloading."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)
    try:
        return _call_builder(reference, name, args, weights=weights)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        # no network (URLError is an OSError); a damaged file; model_args that changed the pretrained shapes
        if not cached.is_file():
            raise ModelError(
                f"model {reference!r}: the pretrained weights {weights} are not in torch's hub cache and could "
                f"not be downloaded ({type(exc).__name__}: {exc}). torchvision expects the file {cached.name} in "
                f"{cached.parent}. Run once on a machine with network access (it is downloaded there), copy the "
                f"file from {weights.url} into that folder (TORCH_HOME moves it), or drop model_args.weights."
            ) from exc
        raise ModelError(
            f"model {reference!r}: the pretrained weights in {cached} do not load into {name} with model_args "
            f"{args}: {type(exc).__name__}: {exc}. Remove model_args that change the architecture, or delete the "
            "file if it is damaged so that it is fetched again."
        ) from exc


def _final_linear(model: nn.Module, reference: str) -> tuple[str, nn.Linear]:
    """The classification layer: the last `nn.Linear` in `named_modules()` order."""
    linears = [(path, module) for path, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ModelError(
            f"model {reference!r} has no nn.Linear classification layer (its head is convolutional), so the "
            "tuned dropout and a pretrained head have nowhere to go. Choose another torchvision model "
            "(e.g. mobilenet_v3_small or resnet18), or wrap this one in a 'file.py:build' factory."
        )
    return linears[-1]


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    """Swap the submodule at dotted `path` (e.g. "classifier.1") for `module`."""
    parent_path, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent_path), attr, module)


def _adapt_input_channels(model: nn.Module, reference: str, in_channels: int, *, pretrained: bool) -> None:
    """The first Conv2d rebuilt for `in_channels` inputs; pretrained kernels summed over RGB, shared equally."""
    path, conv = next(((p, m) for p, m in model.named_modules() if isinstance(m, nn.Conv2d)), ("", None))
    if conv is not None and conv.in_channels == in_channels:
        return
    if conv is None or conv.groups != 1:
        raise ModelError(
            f"model {reference!r}: its first layer is not a plain nn.Conv2d, so it cannot be rebuilt for "
            f"{in_channels} input channels. Use 3-channel images (channels = 3) or another model."
        )
    new = nn.Conv2d(
        in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
        dilation=conv.dilation, bias=conv.bias is not None, padding_mode=conv.padding_mode,
    )
    if pretrained:
        with torch.no_grad():
            new.weight.copy_(conv.weight.sum(dim=1, keepdim=True).repeat(1, in_channels, 1, 1) / in_channels)
            if conv.bias is not None:
                new.bias.copy_(conv.bias)
    _replace(model, path, new)


def _set_dropout(model: nn.Module, reference: str, p: float) -> None:
    """The head's own Dropout layers set to `p`, or a Dropout(p) put before the final Linear (see the table)."""
    path, linear = _final_linear(model, reference)
    parent = model.get_submodule(path.rpartition(".")[0])
    dropouts = [child for child in parent.children() if isinstance(child, nn.Dropout)]
    for dropout in dropouts:
        dropout.p = p
    if not dropouts:
        _replace(model, path, nn.Sequential(nn.Dropout(p), linear))


def _user_model(spec: Mapping[str, Any]) -> nn.Module:
    """The user's factory called with the data's shape, the tuned dropout and model_args."""
    reference = str(spec["model"])
    factory = _factory(reference)
    kwargs = {
        "num_classes": int(spec["num_classes"]),
        "in_channels": int(spec["in_channels"]),
        "dropout": float(spec["dropout"]),
        **spec["model_args"],
    }
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # some builtins have no signature; calling them is the only check left
        signature = None
    if signature is not None:
        try:
            signature.bind(**kwargs)
        except TypeError as exc:
            raise ModelError(
                f"model {reference!r}: the factory cannot be called as {FACTORY_SIGNATURE} with model_args "
                f"{sorted(spec['model_args'])} ({exc}); its signature is {signature}. Define it as "
                f"`def {reference.rpartition(':')[2]}(num_classes, in_channels, dropout, **model_args)`, "
                "accepting every model_args key."
            ) from None
    try:
        model = factory(**kwargs)
    except Exception as exc:  # the user's code: anything it raises is reported with the reference
        raise ModelError(
            f"model {reference!r}: the factory raised {type(exc).__name__}: {exc} (called with {kwargs}). "
            "Fix the factory or the model_args."
        ) from exc
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"model {reference!r}: the factory returned a value of type {type(model).__name__}, not an nn.Module. "
            "Make it return the model itself (e.g. `return MyNet(...)`), not a class, a tuple or a state_dict."
        )
    return model


def _factory(reference: str) -> Callable[..., Any]:
    """The callable a `file.py:name` or `package.module:name` reference points at."""
    target, _, attr = reference.rpartition(":")
    if target.endswith(".py"):
        module = _import_file(reference, target)
        where = f"file {module.__file__}"
    else:
        module = _import_module(reference, target)
        where = f"module {target!r}"
    factory: Any = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            public = sorted(name for name, value in vars(factory).items()  # its own, not what it imported
                            if not name.startswith("_") and callable(value)
                            and getattr(value, "__module__", module.__name__) == module.__name__)
            close = difflib.get_close_matches(part, public, n=3)
            guess = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
            raise ModelError(
                f"model {reference!r}: {where} has no attribute {attr!r} (its functions and classes: {public}{guess})."
                f" Fix the name after ':' or define `def {attr or 'build'}(num_classes, in_channels, dropout, "
                "**model_args)` there, returning an nn.Module."
            )
        factory = getattr(factory, part)
    if not callable(factory):
        raise ModelError(
            f"model {reference!r}: {attr!r} in {where} is a value of type {type(factory).__name__}, not a "
            f"function. Point the reference at a factory {FACTORY_SIGNATURE} that returns an nn.Module."
        )
    return factory


def _import_file(reference: str, target: str) -> ModuleType:
    """The factory's file as a module (see user_code.import_file), its failures as ModelErrors."""
    path = Path(target).expanduser().resolve()
    if not path.is_file():
        raise ModelError(
            f"model {reference!r}: the file {path} does not exist. Fix the path before ':' (relative paths in a "
            "study file are relative to the study file's folder), or create the file."
        )
    try:
        return import_file(path)
    except Exception as exc:  # the user's code: a syntax error, a failing import, anything at top level
        raise ModelError(
            f"model {reference!r}: importing {path} raised {type(exc).__name__}: {exc}. Fix the file (run "
            f"`python {path}` to see the full error)."
        ) from exc


def _import_module(reference: str, target: str) -> ModuleType:
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        raise ModelError(
            f"model {reference!r}: module {target!r} is not importable ({exc}). Install the package, put its "
            "folder on PYTHONPATH, or refer to the file directly as 'path/to/file.py:build'."
        ) from exc
    except Exception as exc:  # the user's code raising at import time
        raise ModelError(
            f"model {reference!r}: importing module {target!r} raised {type(exc).__name__}: {exc}. Fix the module."
        ) from exc
