"""torch.hub entry points: every model of `models.list_models()` (RedNet-26…152, DDF-ResNet, the DCD nets, the face
nets, `dynconv_resnet*` for any operator).

    model = torch.hub.load("path/to/clone", "rednet50", source="local")
    model = torch.hub.load("path/to/clone", "ddf_mul_resnet50", source="local", pretrained_file="ddf_mul_r50.pth")
    model = torch.hub.load("path/to/clone", "dynconv_resnet50", source="local", op="odconv", policy="all_3x3")

Keyword arguments are `timm.create_model`'s for our models: `num_classes`, `in_chans`, `op`, `policy` and the
model's and operator's options. `pretrained_file` is read without running code (`weights_only=True`) and may be a
`last.pt`/`best.pt` of train.py (`use_ema=True` takes its EMA weights), a state_dict of our keys
(scripts/convert_checkpoint.py), or an official checkpoint, whose keys `models.load_official` converts.
"""
dependencies = ["torch", "timm"]

import models as _models
from dynconv import checkpoint as _checkpoint


def _load(model, name: str, file: str, use_ema: bool) -> None:
    state = _checkpoint.load(file)
    trainer = isinstance(state, dict) and "model" in state and "config" in state  # train.py's last.pt/best.pt
    if trainer:
        state = state["ema" if use_ema else "model"]
        if state is None:
            raise ValueError(f"pretrained_file={file} holds no EMA weights (trained with trainer.model_ema=false); "
                             "drop use_ema=True")
    elif use_ema:
        raise ValueError(f"use_ema=True needs a last.pt/best.pt of train.py; pretrained_file={file} is a state_dict")
    ours = model.state_dict()
    if not trainer and state.keys() != ours.keys():  # an official checkpoint's layout
        _models.load_official(model, state)
        return
    missing, unexpected = sorted(ours.keys() - state.keys()), sorted(state.keys() - ours.keys())
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in ours.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise ValueError(f"pretrained_file={file} does not fit {name} as built (missing keys {missing[:3]}, unexpected "
                         f"keys {unexpected[:3]}, other shapes {shapes[:3]}); pass the options it was trained with "
                         "(num_classes=, in_chans=, op=, policy=)")
    model.load_state_dict(state)


def _entry(name: str):
    def entry(pretrained_file: str | None = None, use_ema: bool = False, **kwargs):
        model = _models.create(name, **kwargs)
        if pretrained_file is not None:
            _load(model, name, pretrained_file, use_ema)
        return model

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = (f"`{name}` (`timm.create_model({name!r}, **kwargs)` after `import models`), with the weights "
                     "of `pretrained_file` if given (see this module's docstring).")
    return entry


for _name in _models.list_models():
    globals()[_name] = _entry(_name)
