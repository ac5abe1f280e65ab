"""The architecture registry: name → builder, pretrained weights, input kind, Grad-CAM stages, source.

Every system cov3d offers is one :class:`Arch` entry; `--arch` choices, its help,
`docs/architectures.md` (checked by a test), the checkpoint loader and `cov3d
explain` all read this table, so a new architecture is one builder plus one
entry. Importing it loads neither torch nor torchvision: builders and weights
import what they need when called, so `cov3d --help` stays fast.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cov3d.errors import Cov3dError
from cov3d.models.defaults import DROPOUT, PENULTIMATE

VOLUME, SLICES = "volume", "slices"
STAGES = 4  # backbone stages Grad-CAM can look at; 4 is the last, what the head pools
ARCH_ATTRIBUTE = "cov3d_arch"  # build_model stores the arch name on the model under this attribute


class Weights(Protocol):
    """Where one component's pretrained weights come from; a torchvision ``WeightsEnum`` member is one."""

    @property
    def url(self) -> str: ...  # named in error messages: where to download the file for --weights PATH

    def get_state_dict(self, progress: bool = True) -> Mapping[str, Any]: ...


@dataclass(frozen=True)
class TorchvisionWeights:
    """torchvision's weights enum member `spec` ("module.Enum.MEMBER" under torchvision.models), looked up
    only when used so that the registry loads no torchvision."""

    spec: str

    def resolve(self) -> Weights:
        from cov3d._torchvision import import_torchvision

        obj: Any = import_torchvision().models
        for part in self.spec.split("."):
            obj = getattr(obj, part)
        return obj

    @property
    def url(self) -> str:
        return self.resolve().url

    def get_state_dict(self, progress: bool = True) -> Mapping[str, Any]:
        # Downloads into the torch hub cache the first time, then reads it from there.
        return self.resolve().get_state_dict(progress=progress)


@dataclass(frozen=True)
class UrlWeights:
    """A state dict file at `url`, fetched into the torch hub cache like torchvision's own weights."""

    url: str

    def get_state_dict(self, progress: bool = True) -> Mapping[str, Any]:
        import torch

        return torch.hub.load_state_dict_from_url(self.url, map_location="cpu", progress=progress,
                                                  weights_only=True)


Stage = str | tuple[str, ...]  # the dotted name(s) of one stage's module(s) in the built model


@dataclass(frozen=True)
class Arch:
    """One architecture: how to build it, what it starts from and where Grad-CAM looks."""

    name: str
    input: str  # VOLUME: (B, 1, D, H, W) 3D convolutions; SLICES: a 2D CNN over each of the D slices
    weights: tuple[Weights, ...]  # pretrained weights per component; () trains from scratch
    components: tuple[str, ...]  # what each of `weights` is for, in the order --weights files are given
    build: Callable[..., Any]  # build(states: list[dict] | None, **options) -> nn.Module
    source: str  # the seed paper it comes from
    summary: str
    # Per backbone stage 1…4, the module(s) whose output Grad-CAM weighs, as `model.get_submodule` names them;
    # several names (one per backbone of a fused model) have their maps averaged.
    stages: tuple[Stage, ...]

    def __post_init__(self) -> None:
        if len(self.stages) != STAGES:
            raise Cov3dError(f"architecture '{self.name}' names {len(self.stages)} Grad-CAM stages; give "
                             f"stages=(…) with the module name(s) of each of its {STAGES} backbone stages")
        if len(self.weights) != len(self.components):
            raise Cov3dError(f"architecture '{self.name}' has {len(self.weights)} weights for "
                             f"{len(self.components)} components; give one component name per weights")

    def stage_names(self, stage: int) -> tuple[str, ...]:
        """The module name(s) of backbone stage `stage` (1…4)."""
        names = self.stages[stage - 1]
        return (names,) if isinstance(names, str) else tuple(names)

    @property
    def pretrained_by_default(self) -> bool:
        return bool(self.weights)

    @property
    def weights_name(self) -> str:
        return "Kinetics-400" if self.input == VOLUME else "ImageNet"


def _video(name: str):
    def build(states, **options):
        from cov3d._torchvision import import_torchvision
        from cov3d.models.video import video_resnet

        import_torchvision()
        from torchvision.models import video

        return video_resnet(getattr(video, name), states[0] if states else None, name, **options)

    return build


def _regnet(blocks: tuple[int, ...], widths: tuple[int, ...], group_width: int = 8, bottleneck_ratio: float = 1.0):
    def build(states, **options):
        from cov3d.models.regnet import RegNet3d

        return RegNet3d(blocks, widths, group_width, bottleneck_ratio, **options)

    return build


def _resnet2d(depth: int):
    def build(states, **options):
        from cov3d.models.slices import resnet_slices

        return resnet_slices(depth, states[0] if states else None, **options)

    return build


def _densenet2d(states, **options):
    from cov3d.models.slices import densenet_slices

    return densenet_slices(states[0] if states else None, **options)


def _res_dense(states, **options):
    from cov3d.models.slices import res_dense_slices

    resnet, densenet = states if states else (None, None)
    return res_dense_slices(resnet, densenet, **options)


# Grad-CAM stages by module name. Cov3dNet's layerN is the residual layer and its dropout; RegNet3d's stages.
_VIDEO_STAGES = ("layer1", "layer2", "layer3", "layer4")
_REGNET_STAGES = ("stages.0", "stages.1", "stages.2", "stages.3")
# A SliceNet's stage 4 is its whole backbone: what the head pools (for DenseNet, after its final ReLU).
# A 2D ResNet body is conv1, bn1, relu, maxpool, layer1…layer4; a DenseNet body is (features, ReLU).
_RESNET_STAGES = ("backbone.4", "backbone.5", "backbone.6", "backbone")
_DENSENET_STAGES = ("backbone.0.denseblock1", "backbone.0.denseblock2", "backbone.0.denseblock3", "backbone")
_RES_DENSE_STAGES = tuple((f"backbone.resnet.{3 + i}", f"backbone.densenet.0.denseblock{i}") for i in (1, 2, 3)) \
    + ("backbone",)

_tv = TorchvisionWeights
_KINETICS = "Kinetics-400 video ResNet from torchvision"
ARCHS: dict[str, Arch] = {a.name: a for a in [
    Arch("r3d_18", VOLUME, (_tv("video.R3D_18_Weights.KINETICS400_V1"),), ("r3d_18",), _video("r3d_18"),
         "seed 002 (Cov3d)", f"{_KINETICS}, 3D convolutions throughout: the paper's model", _VIDEO_STAGES),
    Arch("mc3_18", VOLUME, (_tv("video.MC3_18_Weights.KINETICS400_V1"),), ("mc3_18",), _video("mc3_18"),
         "seed 002 (Cov3d) variant", f"{_KINETICS}, 3D convolutions in the stem only, then 2D", _VIDEO_STAGES),
    Arch("r2plus1d_18", VOLUME, (_tv("video.R2Plus1D_18_Weights.KINETICS400_V1"),), ("r2plus1d_18",),
         _video("r2plus1d_18"), "seed 002 (Cov3d) variant", f"{_KINETICS}, (2+1)D factorised convolutions",
         _VIDEO_STAGES),
    Arch("regnet3d", VOLUME, (), (), _regnet((2, 6, 12, 4), (48, 128, 256, 512)), "seed 004 (3D RegNet)",
         "3D RegNet, blocks [2,6,12,4], widths [48,128,256,512], group width 8, bottleneck 1: the seed's best",
         _REGNET_STAGES),
    Arch("regnet3d-shallow", VOLUME, (), (), _regnet((1, 3, 7, 4), (48, 128, 256, 512)), "seed 004 (3D RegNet)",
         "3D RegNet, blocks [1,3,7,4], widths [48,128,256,512], group width 8: the seed's shallower row",
         _REGNET_STAGES),
    Arch("regnet3d-wide", VOLUME, (), (), _regnet((2, 6, 12, 4), (64, 128, 256, 512)), "seed 004 (3D RegNet)",
         "3D RegNet, blocks [2,6,12,4], widths [64,128,256,512], group width 8: the seed's wider row",
         _REGNET_STAGES),
    Arch("resnet50", SLICES, (_tv("ResNet50_Weights.IMAGENET1K_V2"),), ("resnet50",), _resnet2d(50),
         "seed 003 (2D CNN)", "ImageNet ResNet-50 on each slice; scan = mean of slice probabilities",
         _RESNET_STAGES),
    Arch("resnet101", SLICES, (_tv("ResNet101_Weights.IMAGENET1K_V2"),), ("resnet101",), _resnet2d(101),
         "seed 000 (Res-Dense Net) backbone", "ImageNet ResNet-101 on each slice", _RESNET_STAGES),
    Arch("densenet121", SLICES, (_tv("DenseNet121_Weights.IMAGENET1K_V1"),), ("densenet121",), _densenet2d,
         "seed 000 (Res-Dense Net) backbone", "ImageNet DenseNet-121 on each slice", _DENSENET_STAGES),
    Arch("res-dense", SLICES, (_tv("ResNet101_Weights.IMAGENET1K_V2"), _tv("DenseNet121_Weights.IMAGENET1K_V1")),
         ("resnet101", "densenet121"), _res_dense, "seed 000 (Res-Dense Net)",
         "ResNet-101 and DenseNet-121 feature maps projected to 1024 channels and added, on each slice",
         _RES_DENSE_STAGES),
]}


def get_arch(name: str) -> Arch:
    try:
        return ARCHS[name]
    except KeyError:
        raise Cov3dError(f"architecture '{name}' is not one of {', '.join(ARCHS)}") from None


def arch_help() -> str:
    """`--arch`'s help: the architectures by input kind."""
    volume = ", ".join(a.name for a in ARCHS.values() if a.input == VOLUME)
    slices = ", ".join(a.name for a in ARCHS.values() if a.input == SLICES)
    return f"3D on the volume: {volume}. 2D on each slice: {slices}. See docs/architectures.md"


def _pretrained_state(arch: Arch, index: int, path: Path | None) -> dict:
    """One component's pretrained state dict: from a local file, else from its `Weights` (for torchvision's,
    through its weights API)."""
    import urllib.error

    import torch

    weights = arch.weights[index]
    component = arch.components[index]
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise Cov3dError(f"weights file '{path}' does not exist")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # any unpickling or format failure means the same to the user
            raise Cov3dError(f"weights file '{path}' is not a torch state dict ({type(error).__name__}); "
                             f"use the {arch.weights_name} checkpoint {weights.url}") from None
        return state.get("state_dict", state) if isinstance(state, dict) else state
    try:
        return weights.get_state_dict(progress=True)
    except (urllib.error.URLError, OSError, RuntimeError) as error:
        raise Cov3dError(
            f"pretrained {component} {arch.weights_name} weights could not be loaded ({error}); download "
            f"{weights.url} and pass it with --weights PATH, or train from scratch with --no-pretrained"
        ) from None


def resolve_pretrained(arch: str, pretrained: bool | None, weights_files: int = 0) -> bool:
    """Whether `arch` starts from pretrained weights; None means its default. Checks the --weights count."""
    spec = get_arch(arch)
    if pretrained is None:
        pretrained = spec.pretrained_by_default
    if pretrained:
        if not spec.weights:
            raise Cov3dError(f"no pretrained weights exist for --arch {arch}; it trains from scratch: "
                             "leave out --pretrained, or pass --no-pretrained")
        if weights_files and weights_files != len(spec.weights):
            raise Cov3dError(f"--arch {arch} takes {len(spec.weights)} --weights file(s) "
                             f"({', then '.join(spec.components)}), got {weights_files}")
    elif weights_files:
        raise Cov3dError("--weights was given with --no-pretrained; drop one of them")
    return pretrained


def build_model(
    arch: str = "r3d_18",
    *,
    pretrained: bool | None = None,
    weights: Sequence[Path] = (),
    penultimate: int = PENULTIMATE,
    dropout: float = DROPOUT,
    pool: str = "avg",
    final_bias: bool = True,
    slices: int = 0,
    lungs: str = "off",
):
    """Build a cov3d network: (B, 1, D, H, W) → (B, 6); with ``lungs="split"``, (B, 2, D, H, W) → (B, 6).

    `pretrained=None` takes the architecture's default (pretrained when weights
    exist). Pretrained weights come from the local `weights` files (one per
    component, in the order of ``Arch.components``) or from each component's
    ``Arch.weights``; when they cannot be had this stops, never silently random.
    The model carries its arch name (attribute ``cov3d_arch``), which `cov3d
    explain` reads to find its stages.
    """
    spec = get_arch(arch)
    weights = [Path(w) for w in weights]
    states = None
    if resolve_pretrained(arch, pretrained, len(weights)):
        states = [_pretrained_state(spec, i, weights[i] if weights else None) for i in range(len(spec.weights))]
    options: dict[str, Any] = dict(penultimate=penultimate, dropout=dropout, pool=pool, final_bias=final_bias)
    if spec.input == SLICES:
        options["slices"] = slices
    model = spec.build(states, **options)
    setattr(model, ARCH_ATTRIBUTE, arch)  # a plain attribute: not in the state dict, so checkpoints are unchanged
    if lungs == "split":
        from cov3d.models.pair import lung_pair

        model = lung_pair(model)  # both lungs through the one network (cov3d.models.pair)
    return model


def memory_format(arch: str):
    """The fast layout for this architecture's parameters: channels_last_3d for 3D, channels_last for 2D."""
    import torch

    return torch.channels_last_3d if get_arch(arch).input == VOLUME else torch.channels_last


def check_trainable(arch: str, depth: int, width: int, batch_size: int, *, slices: int = 0,
                    **options) -> None:
    """Refuse an input size or batch size that `arch` cannot train on, before any data is read.

    Builds the network on torch's meta device (shapes only: no memory, no
    arithmetic, a fraction of a second) and runs one training-mode forward pass
    of a (batch_size, 1, depth, width, width) batch. BatchNorm in training needs
    more than one value per channel, so a batch of 1 fails where the last stage
    sees one voxel per scan; a network that cannot take the size at all fails
    too. Operations the meta device lacks (a custom builder's) skip the check.
    """
    import torch

    with torch.device("meta"):
        model = build_model(arch, pretrained=False, slices=slices, **options)
        batch = torch.zeros(batch_size, 1, depth, width, width)
    model.train()
    shape = f"{depth}x{width}x{width}"
    try:
        model(batch)
    except NotImplementedError:  # an operation without a meta kernel: the first real step will tell
        return
    except ValueError as error:
        if "more than 1 value per channel" not in str(error):
            raise
        more = " (or more --slices)" if get_arch(arch).input == SLICES and slices else ""
        raise Cov3dError(f"--batch-size {batch_size} is too small for --arch {arch} at {shape}: in training, "
                         "BatchNorm needs more than one value per channel, and this batch gives its last stage "
                         f"only one; use --batch-size 2 or more{more}, or a larger --depth and --width") from None
    except RuntimeError as error:
        detail = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise Cov3dError(f"--arch {arch} cannot take {shape} inputs ({detail}); choose another --width or "
                         "--depth, or another --arch") from None
