"""BioViL and BioViL-T as phrase-grounding baselines (``--model biovil``, ``--model biovil-t``).

The paper compares with the two models through Microsoft's ``hi-ml-multimodal`` (version
0.2.2) in the authors' ``eval_biovil_t.py``: per MS-CXR sample it calls
``ImageTextInferenceEngine.get_similarity_map_from_raw_data(image_path, phrase)`` and clamps
the map at 0. This module computes the same map, step by step:

1. the image as ``hi-ml-multimodal``'s ``load_image`` gives it: min-max remapped to uint8;
2. its inference transform: ``Resize(512)`` (short side, bilinear PIL resize),
   ``CenterCrop(480)`` for BioViL / ``CenterCrop(448)`` for BioViL-T, to [0, 1], 3 channels;
3. L2-normalised projected patch embeddings of the image model (a 15 x 15 grid for BioViL,
   14 x 14 for BioViL-T) against the L2-normalised projected [CLS] embedding of CXR-BERT
   (the phrase with trailing ``!?.`` stripped): cosine similarity per patch;
4. Gaussian smoothing of that grid (sigma 1.5 patches, ``scipy.ndimage.gaussian_filter``);
5. nearest-neighbour upsampling to ``int(crop * short_side / 512)`` pixels square, then NaN
   padding to the original W x H (floor left/top, ceil right/bottom);
6. ``clamp(min=0)`` (the authors' line; NaN stays NaN).

Why not import ``hi-ml-multimodal`` itself: its image encoder is torchvision's ResNet-50, and
torchvision's wheels on PyPI are built against CUDA torch; next to a CPU build of torch they
fail at import ("operator torchvision::nms does not exist"), and a CPU torchvision is not on
PyPI. ``timm`` (which it also imports) depends on torchvision too. So the networks here are
small re-implementations whose parameter names match ``hi-ml-multimodal``'s modules, so its
checkpoints load with plain ``load_state_dict``:

* :class:`ResNet50` has torchvision's layout (``conv1``, ``bn1``, ``layer1..4`` of v1.5
  bottlenecks with the stride on the 3x3 conv, ``downsample.0/1``, ``fc``);
* :class:`BiovilImageModel` is ``ImageModel``: ``encoder.encoder`` (the ResNet), for
  BioViL-T also ``encoder.backbone_to_vit`` and ``encoder.missing_previous_emb``, and the
  1x1-conv projector ``projector.model.{0,1,3}``. BioViL-T's temporal ViT pooler
  (``encoder.vit_pooler.*``) only runs when a previous image is given; the inference
  engine never gives one, so it uses the "missing previous image" embedding instead, and
  those checkpoint entries are left unused;
* :class:`CxrBertTextModel` is CXR-BERT (``CXRBertModel``, a ``BertForMaskedLM`` plus a
  projection head) built from ``transformers.BertModel`` and a small head, so no
  ``trust_remote_code``: ``bert.*`` and ``cls_projection_head.*`` load as saved; the MLM head
  (``cls.predictions.*``) is not needed.

Weights: the files ``hi-ml-multimodal`` 0.2.2 downloads, at the same Hub revisions
(``microsoft/BiomedVLP-CXR-BERT-specialized@v1.1`` for BioViL,
``microsoft/BiomedVLP-BioViL-T@v1.0`` for BioViL-T), read with ``torch.load(weights_only=True)``
(or safetensors when a local folder has it); the image weights are checked against the MD5
sums ``hi-ml-multimodal`` pins.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LdmGroundError

RESIZE = 512  # hi-ml-multimodal's TRANSFORM_RESIZE
SMOOTH_SIGMA = 1.5  # patches; ImageTextInferenceEngine._get_similarity_map_from_embeddings
JOINT_FEATURE_SIZE = 128


@dataclass(frozen=True)
class BiovilVariant:
    """What differs between BioViL and BioViL-T (values from hi-ml-multimodal 0.2.2)."""

    name: str
    repo_id: str
    revision: str
    image_weights: str
    image_weights_md5: str
    crop_size: int
    multi_image: bool  # BioViL-T's encoder: ResNet-50 + 1x1 conv + "missing previous image" channels


VARIANTS = {
    "biovil": BiovilVariant(
        name="biovil",
        repo_id="microsoft/BiomedVLP-CXR-BERT-specialized",
        revision="v1.1",
        image_weights="biovil_image_resnet50_proj_size_128.pt",
        image_weights_md5="02ce6ee460f72efd599295f440dbb453",
        crop_size=480,
        multi_image=False,
    ),
    "biovil-t": BiovilVariant(
        name="biovil-t",
        repo_id="microsoft/BiomedVLP-BioViL-T",
        revision="v1.0",
        image_weights="biovil_t_image_model_proj_size_128.pt",
        image_weights_md5="a83080e2f23aa584a4f2b24c39b1bb64",
        crop_size=448,
        multi_image=True,
    ),
}


def variant(kind: str) -> BiovilVariant:
    try:
        return VARIANTS[kind]
    except KeyError:
        raise LdmGroundError(f"unknown BioViL model {kind!r}; known: {', '.join(VARIANTS)}") from None


# --- image network --------------------------------------------------------------------------


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck (stride on the 3x3 conv), same parameter names."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + identity)


class ResNet50(nn.Module):
    """torchvision's ``resnet50`` trunk (same state-dict keys, ``fc`` included so checkpoints
    load strictly); ``forward`` returns the last feature map (stride 32), as hi-ml's
    ``ResNetHIML`` does. ``blocks`` and ``width`` shrink it for tests (defaults: ResNet-50)."""

    def __init__(self, blocks: Sequence[int] = (3, 4, 6, 3), width: int = 64, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = width
        for i, n in enumerate(blocks):
            planes = width * 2**i
            layers = [Bottleneck(inplanes, planes, 1 if i == 0 else 2)]
            inplanes = planes * Bottleneck.expansion
            layers += [Bottleneck(inplanes, planes) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        self.out_channels = inplanes
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)  # unused, kept for the checkpoint's keys
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class _ImageTrunk(nn.Module):
    """hi-ml's ``ImageEncoder`` / ``MultiImageEncoder`` for a single (current) image."""

    def __init__(self, resnet: ResNet50, multi_image: bool, vit_dim: int = 256):
        super().__init__()
        self.encoder = resnet
        self.multi_image = multi_image
        if multi_image:
            self.backbone_to_vit = nn.Conv2d(resnet.out_channels, vit_dim, 1, bias=False)
            self.missing_previous_emb = nn.Parameter(torch.zeros(1, vit_dim, 1, 1))
            nn.init.trunc_normal_(self.missing_previous_emb, std=0.02)
        self.out_channels = 2 * vit_dim if multi_image else resnet.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = self.encoder(x)
        if not self.multi_image:
            return patches
        patches = self.backbone_to_vit(patches)
        missing = self.missing_previous_emb.expand(-1, -1, *patches.shape[2:]).expand(patches.shape[0], -1, -1, -1)
        return torch.cat([patches, missing], dim=1)


class BiovilImageModel(nn.Module):
    """hi-ml's ``ImageModel`` at inference: trunk + 1x1-conv projector into the joint space."""

    def __init__(self, multi_image: bool, blocks=(3, 4, 6, 3), width=64, vit_dim=256, joint_dim=JOINT_FEATURE_SIZE):
        super().__init__()
        self.encoder = _ImageTrunk(ResNet50(blocks, width), multi_image, vit_dim)
        feat = self.encoder.out_channels
        self.projector = nn.Module()
        self.projector.model = nn.Sequential(
            nn.Conv2d(feat, joint_dim, 1, bias=False),
            nn.BatchNorm2d(joint_dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(joint_dim, joint_dim, 1, bias=True),
        )

    @torch.no_grad()
    def patch_embeddings(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> L2-normalised projected patch embeddings (B, h, w, D)."""
        emb = self.projector.model(self.encoder(x))
        return F.normalize(emb, dim=1).permute(0, 2, 3, 1)


def load_image_state(model: BiovilImageModel, state: dict[str, torch.Tensor], source: str = "") -> None:
    """Load an ``ImageModel`` checkpoint; every parameter must be there, and the only entries
    left over may be BioViL-T's temporal pooler (``encoder.vit_pooler.*``, unused here)."""
    state = {k: v for k, v in state.items() if not (model.encoder.multi_image and k.startswith("encoder.vit_pooler."))}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise LdmGroundError(
            f"image weights {source} do not fit the BioViL image model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )


# --- text network ----------------------------------------------------------------------------


class _ProjectionHead(nn.Module):
    """CXR-BERT's ``BertProjectionHead`` (same names): dense, GELU, LayerNorm, dense."""

    def __init__(self, hidden_size: int, projection_size: int):
        super().__init__()
        self.dense_to_hidden = nn.Linear(hidden_size, projection_size)
        self.LayerNorm = nn.LayerNorm(projection_size, eps=1e-12)
        self.dense_to_output = nn.Linear(projection_size, projection_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_to_output(self.LayerNorm(F.gelu(self.dense_to_hidden(x))))


BERT_CONFIG_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "max_position_embeddings",
    "type_vocab_size",
    "initializer_range",
    "layer_norm_eps",
    "pad_token_id",
    "position_embedding_type",
)


class CxrBertTextModel(nn.Module):
    """CXR-BERT's text side: ``BertModel`` (no pooler, as in ``BertForMaskedLM``) + the [CLS]
    projection head. Parameter names match ``CXRBertModel``'s checkpoints."""

    def __init__(self, config: dict):
        super().__init__()
        from transformers import BertConfig, BertModel

        cfg = BertConfig(**{k: config[k] for k in BERT_CONFIG_KEYS if k in config})
        self.bert = BertModel(cfg, add_pooling_layer=False)
        self.cls_projection_head = _ProjectionHead(cfg.hidden_size, int(config.get("projection_size", 128)))
        self.max_length = cfg.max_position_embeddings

    @torch.no_grad()
    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids -> L2-normalised projected [CLS] embeddings (B, D)."""
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return F.normalize(self.cls_projection_head(hidden[:, 0]), dim=1)


def load_text_state(model: CxrBertTextModel, state: dict[str, torch.Tensor], source: str = "") -> None:
    """Load a ``CXRBertModel`` checkpoint, leaving out its MLM head and old position-id buffer."""
    drop = ("cls.predictions.", "bert.embeddings.position_ids", "bert.embeddings.token_type_ids", "bert.pooler.")
    state = {k: v for k, v in state.items() if not k.startswith(drop)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise LdmGroundError(
            f"text weights {source} do not fit CXR-BERT: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def bert_tokenizer(vocab: str | Path | dict[str, int], tokenizer_config: dict | None = None):
    """CXR-BERT's tokenizer (a plain uncased BERT WordPiece) from ``vocab.txt`` or a dict."""
    from transformers import BertTokenizer

    cfg = tokenizer_config or {}
    keys = ("do_lower_case", "tokenize_chinese_chars", "strip_accents")
    kwargs = {k: cfg[k] for k in keys if k in cfg}
    return BertTokenizer(vocab=str(vocab) if isinstance(vocab, Path) else vocab, **kwargs)


# --- building and loading ----------------------------------------------------------------------

SMALL = dict(blocks=(1, 1, 1, 1), width=8, vit_dim=16, joint_dim=16)
SMALL_BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, projection_size=16)
BERT_BASE = dict(
    vocab_size=30522,
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    max_position_embeddings=512,
    type_vocab_size=2,
    layer_norm_eps=1e-12,
    pad_token_id=0,
    projection_size=128,
)


def toy_vocab() -> dict[str, int]:
    """A WordPiece vocabulary that spells any lower-case ASCII text (random-weight models)."""
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = [chr(c) for c in range(33, 127) if not chr(c).isupper()]
    tokens += chars + ["##" + c for c in chars]
    return {t: i for i, t in enumerate(tokens)}


def build_biovil_networks(kind: str, small: bool = False, seed: int = 0, vocab_size: int | None = None):
    """Randomly initialised (image model, text model) of the real classes; ``small`` shrinks
    widths and depths (same structure, same 32-pixel patch grid) for tests."""
    v = variant(kind)
    torch.manual_seed(seed)
    image = BiovilImageModel(v.multi_image, **(SMALL if small else {}))
    cfg = dict(BERT_BASE, **(SMALL_BERT if small else {}))
    if vocab_size is not None:
        cfg["vocab_size"] = vocab_size
    text = CxrBertTextModel(cfg)
    return image.eval(), text.eval()


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt file, or a pickle that is more than tensors
        raise LdmGroundError(f"cannot read weights {path}: {err}") from err


def _fetch(v: BiovilVariant, weights: str | None) -> dict[str, Path]:
    """Paths of config.json, vocab.txt, tokenizer_config.json (optional), text and image
    weights: from a local folder, or from the Hub (or its cache) at hi-ml's revision."""
    text_names = ("model.safetensors", "pytorch_model.bin")
    if weights is not None:
        folder = Path(weights)
        if not folder.is_dir():
            raise LdmGroundError(f"BioViL weights folder {folder} does not exist")
        files = {n: folder / n for n in ("config.json", "vocab.txt", "tokenizer_config.json", v.image_weights)}
        text = [folder / n for n in text_names if (folder / n).is_file()]
        missing = [str(p) for n, p in files.items() if n != "tokenizer_config.json" and not p.is_file()]
        if missing or not text:
            what = missing + ([] if text else [f"{folder}/pytorch_model.bin"])
            raise LdmGroundError(f"BioViL weights folder lacks {', '.join(what)} (files of {v.repo_id})")
        files["text"] = text[0]
    else:
        from huggingface_hub import hf_hub_download

        def get(name: str, required: bool = True) -> Path | None:
            try:
                return Path(hf_hub_download(v.repo_id, name, revision=v.revision))
            except Exception as err:  # offline without cache, no access, missing file
                if not required:
                    return None
                raise LdmGroundError(
                    f"cannot get {name} of {v.repo_id}@{v.revision} from the Hugging Face Hub or its cache: "
                    f"{type(err).__name__}: {err}. Download it once with network access, or pass a folder."
                ) from err

        files = {n: get(n) for n in ("config.json", "vocab.txt", v.image_weights)}
        files["tokenizer_config.json"] = get("tokenizer_config.json", required=False)
        files["text"] = get("pytorch_model.bin")
    md5 = _md5(files[v.image_weights])
    if md5 != v.image_weights_md5:
        raise LdmGroundError(
            f"{files[v.image_weights]} has MD5 {md5}, not the {v.image_weights_md5} that hi-ml-multimodal 0.2.2 "
            f"expects for {v.name}"
        )
    return files
