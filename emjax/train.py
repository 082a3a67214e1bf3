"""LoRA fine-tuning: ``emjax train CONFIG [key=value ...]``.

The step is one pure jitted function ``(trainable, opt_state, frozen, batch) -> (trainable, opt_state, metrics)``
that donates what it replaces; parameters and optimiser state are born sharded from ``emjax.sharding``'s table.
Checkpoints (Orbax) hold the LoRA factors, optimiser state, data-iterator position, step and the resolved config;
a run resumes from its work directory, and SIGTERM saves then exits.

``train_many`` (``emjax train CONFIG --run "k=v ..." --run ...``) trains a *pack*: runs that differ only in
optimiser, λ (and seed, on a checkpoint) train their adapters on one copy of the frozen base in one compiled program
(``emjax.multi``), each run still writing its own work directory.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from emjax import config as cfglib
from emjax import lora as loralib
from emjax import paths
from emjax import sharding as shd
from emjax import spectral
from emjax.models import qwen3
from emjax.models.loading import from_pretrained, init_lora

log = logging.getLogger("emjax.train")

# train-row metrics logged as their mean over the steps since the previous row (the others: the row's own step)
WINDOW_MEANS = ("loss", "penalty", "total_loss")

# (key, least value, what it is): checked before anything is built (log_every 0 divided by zero after a step)
POSITIVE_KEYS = (("log_every", 1, "steps between metrics rows"), ("ckpt_every", 1, "steps between checkpoints"),
                 ("keep_ckpts", 1, "checkpoints kept"), ("grad_accum", 1, "micro-batches per step"),
                 ("val_every", 0, "steps between validations; 0: at the end only"),
                 ("val_batches", 0, "validation batches; 0: the whole split"),
                 ("loss_chunk", 0, "0: the whole sequence, or a chunk length"),
                 ("attn_chunk", 0, "0: the whole sequence, or a chunk length"))

PRESETS = {
    # random-init shapes; the real sizes come from emjax.models.qwen3.SIZES
    "tiny": dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16),
    "demo": dict(hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64),
    "bench": dict(hidden_size=512, intermediate_size=1536, num_layers=8, num_heads=8, num_kv_heads=4, head_dim=64),
    # Qwen3-MoE in miniature: every layer routes each token to 2 of 8 experts
    "tiny-moe": dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                     num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True),
}
PEAK_TFLOPS = {"cpu": 0.07, "h100": 989.0, "h200": 989.0, "a100": 312.0, "v5p": 459.0, "v5e": 197.0,
               "v5 lite": 197.0, "v6e": 918.0, "v6 lite": 918.0, "v4": 275.0}


# auto_memory takes a setting whose compiled peak is at most this fraction of the device's limit (the allocator
# fragments; the estimate is XLA's buffer assignment, not the allocator's)
AUTO_MEMORY_FILL = 0.95


class TrainError(RuntimeError):
    pass


def _dtype(name: str | None, key: str = "model.dtype"):
    if name is None:
        return None
    try:
        return jnp.dtype(name)
    except TypeError:
        raise cfglib.ConfigError(f"{key} {name!r}: not a dtype (float32, bfloat16, float16)") from None


# ---------------------------------------------------------------------------------------------------------------
# Model construction


# CPU compile options for the random init, which runs once (see build_model)
INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def build_model(mcfg, lora_cfg: loralib.LoraConfig | None, mesh, *, vocab_size: int | None = None, seed: int = 0):
    """From a checkpoint, or a random init born sharded (jitted init with out_shardings from the rules table)."""
    if mcfg.checkpoint:
        return from_pretrained(mcfg.checkpoint, dtype=_dtype(mcfg.dtype),
                               compute_dtype=_dtype(mcfg.compute_dtype, "model.compute_dtype"),
                               lora=lora_cfg, mesh=mesh, seed=seed)
    if mcfg.preset in qwen3.SIZES:
        qc = qwen3.SIZES[mcfg.preset]()
    elif mcfg.preset in PRESETS:
        qc = qwen3.Qwen3Config(vocab_size=151_936, tie_word_embeddings=True, **PRESETS[mcfg.preset])
    else:
        raise cfglib.ConfigError(f"model.preset {mcfg.preset!r}: use one of {sorted(PRESETS) + sorted(qwen3.SIZES)}")
    if vocab_size is not None:
        qc = qwen3.Qwen3Config(**{**qc.__dict__, "vocab_size": vocab_size})

    def make():
        # Embedding std 1/√d (not HF's 0.02): with tied, RMS-normed outputs a 0.02 table caps every logit near
        # 0.02·d, so a random model could not express a peaked distribution and LoRA could barely lower the loss.
        return qwen3.Qwen3ForCausalLM(qc, lora=lora_cfg, param_dtype=_dtype(mcfg.dtype),
                                      dtype=_dtype(mcfg.compute_dtype, "model.compute_dtype"), rngs=nnx.Rngs(seed),
                                      embed_init_std=qc.hidden_size ** -0.5)

    abstract = nnx.eval_shape(make)
    graphdef, abs_state = nnx.split(abstract)
    shardings = shd.state_shardings(abs_state, mesh)

    def init():
        return nnx.split(make())[1]

    lowered = jax.jit(init, out_shardings=shardings).lower()
    # CPU: LLVM spends most of this program's compile optimising the threefry of every leaf, for code that runs
    # once; unoptimised, the tiny preset's init on the 8-device test mesh compiles 3.4-9.4x faster
    # (bench/cpu_compile.py) and draws the same values up to float rounding
    state = (lowered.compile(INIT_COMPILER_OPTIONS) if jax.default_backend() == "cpu" else lowered.compile())()
    return nnx.merge(graphdef, state)


# ---------------------------------------------------------------------------------------------------------------
# The step


def token_nll(model, batch, *, remat: str = "none", loss_chunk: int = 0, attn_chunk: int = 0):
    """Sum of next-token NLL over loss positions, and their count. loss_mask[t] marks tokens[t] as a target.

    ``loss_chunk`` > 0 computes the logits ``loss_chunk`` positions at a time inside a rematerialised scan, so the
    (B, T, V) fp32 logits and their gradient never exist at once: at Qwen3's 151,936-token vocabulary a batch of
    16 × 2048 tokens has 20 GB of logits. ``remat`` and ``attn_chunk``: see ``Qwen3ForCausalLM.hidden_states``."""
    h = model(batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"], return_hidden=True,
              remat=remat, attn_chunk=attn_chunk)
    h = h[:, :-1]  # drop the last position before the vocab projection, not after
    targets = batch["tokens"][:, 1:]
    mask = batch["loss_mask"][:, 1:].astype(jnp.float32)

    def nll(hc, tc, mc):
        logits = model.logits(hc)
        lse = jax.nn.logsumexp(logits, axis=-1)
        tgt = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
        return jnp.sum((lse - tgt) * mc)

    if loss_chunk <= 0 or loss_chunk >= h.shape[1]:
        return nll(h, targets, mask), jnp.sum(mask)
    # chunks along the sequence (padded positions have mask 0), so every chunk keeps the batch axis whole
    body = jax.checkpoint(nll, prevent_cse=False)
    xs = tuple(qwen3.split_chunks(x, 1, loss_chunk) for x in (h, targets, mask))
    total, _ = jax.lax.scan(lambda acc, c: (acc + body(*c), None), jnp.zeros((), jnp.float32), xs)
    return total, jnp.sum(mask)


def make_grad_fn(graphdef, *, grad_accum: int = 1, with_penalty: bool = False, spectral_kind: str = "fn_ratio",
                 spectral_reduce: str = "mean", lora_scale: float = 1.0, remat: str = "none", loss_chunk: int = 0,
                 attn_chunk: int = 0, lora_layers=None):
    """``(trainable, frozen, batch, spectral_weight) -> (grads, metrics)``: the train step before its optimiser
    update, shared by :func:`make_train_step` and ``emjax.multi`` (which vmaps it over adapters). The penalty is only
    traced ``with_penalty``; ``spectral_weight`` may then be a traced scalar."""

    def micro_loss(trainable, frozen, mb):
        return token_nll(nnx.merge(graphdef, trainable, frozen), mb, remat=remat, loss_chunk=loss_chunk,
                         attn_chunk=attn_chunk)

    def penalty_fn(trainable):
        return spectral.penalty(loralib.adapter_pairs_from_state(trainable), lora_scale, spectral_kind,
                                spectral_reduce, layers=lora_layers)

    def grads_and_metrics(trainable, frozen, batch, spectral_weight):
        # interleave so every micro-batch spans all batch shards
        mbs = jax.tree_util.tree_map(lambda x: x.reshape(-1, grad_accum, *x.shape[1:]).swapaxes(0, 1), batch)
        grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
        def body(carry, mb):
            g_acc, l_acc, n_acc = carry
            (l, n), g = grad_fn(trainable, frozen, mb)
            return (jax.tree_util.tree_map(jnp.add, g_acc, g), l_acc + l, n_acc + n), None

        zeros = jax.tree_util.tree_map(jnp.zeros_like, trainable)
        (g_sum, l_sum, n_tok), _ = jax.lax.scan(body, (zeros, 0.0, 0.0), mbs)
        denom = jnp.maximum(n_tok, 1.0)
        grads = jax.tree_util.tree_map(lambda g: g / denom, g_sum)
        ce = l_sum / denom
        metrics = {"loss": ce, "tokens": n_tok}
        if with_penalty:
            # CPU: jaxlib's batched LAPACK calls block XLA pool threads while they wait; run next to the model's
            # forward or backward they are slowed several-fold (and slow it), so the penalty runs after it
            pen, pen_grads = jax.value_and_grad(penalty_fn)(spectral.after(g_sum, trainable))
            grads = jax.tree_util.tree_map(lambda g, p: g + spectral_weight * p, grads, pen_grads)
            metrics["penalty"] = pen
            metrics["total_loss"] = ce + spectral_weight * pen
        metrics["grad_norm"] = optax.global_norm(grads)
        return grads, metrics

    return grads_and_metrics


def make_train_step(graphdef, tx: optax.GradientTransformation, *, grad_accum: int = 1, spectral_weight: float = 0.0,
                    spectral_kind: str = "fn_ratio", spectral_reduce: str = "mean", lora_scale: float = 1.0,
                    lr_fn: Callable | None = None, remat: str = "none", loss_chunk: int = 0, attn_chunk: int = 0,
                    lora_layers=None):
    """Pure step: token-weighted CE over ``grad_accum`` micro-batches + λ·spectral penalty, one optimiser update.
    ``remat``, ``loss_chunk`` and ``attn_chunk`` trade compute for memory (see ``token_nll``); none changes the
    result. ``lora_layers``: the adapter's ``LoraConfig.layers`` (the penalty counts only them).

    The penalty is traced only when ``spectral_weight`` is non-zero. The step's optional fifth argument replaces
    that λ at call time as data, so runs that differ only in λ > 0 share one compiled program (and its persistent
    cache entry) instead of compiling λ in as a constant; it is ignored when the step was built with λ = 0."""
    grads_fn = make_grad_fn(graphdef, grad_accum=grad_accum, with_penalty=bool(spectral_weight),
                            spectral_kind=spectral_kind, spectral_reduce=spectral_reduce, lora_scale=lora_scale,
                            remat=remat, loss_chunk=loss_chunk, attn_chunk=attn_chunk, lora_layers=lora_layers)

    def step(trainable, opt_state, frozen, batch, lam=None):
        grads, metrics = grads_fn(trainable, frozen, batch, spectral_weight if lam is None else lam)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        if lr_fn is not None:
            metrics["lr"] = lr_fn(opt_state)
        return trainable, opt_state, metrics

    return step


def jit_train_step(fn, trainable, opt_state, frozen, batch_sharding=None, lam_sharding=None):
    """``fn`` (a ``make_train_step`` or ``make_multi_train_step`` step, called with λ) jitted with the adapters and
    optimiser state donated and every sharding stated: they and the frozen base come in, and the adapters and
    optimiser state go out, on the shardings they were born with (the rules table's), the batch on
    ``batch_sharding``. An input placed otherwise is then an error naming both shardings, not a silent reshard or a
    second compiled program. Without a mesh (``batch_sharding`` None) only the outputs' placement is stated."""
    sharding_of = lambda tree: jax.tree_util.tree_map(lambda x: x.sharding, tree)  # noqa: E731
    t_sh, o_sh = sharding_of(trainable), sharding_of(opt_state)
    kw = {}
    if batch_sharding is not None:
        lam_sharding = lam_sharding or jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())
        kw["in_shardings"] = (t_sh, o_sh, sharding_of(frozen), batch_sharding, lam_sharding)
    return jax.jit(fn, donate_argnums=(0, 1), out_shardings=(t_sh, o_sh, None), **kw)


def make_eval_step(graphdef, *, loss_chunk: int = 0, attn_chunk: int = 0, stacked: bool = False):
    """Pure ``ev(trainable, frozen, batch) -> (NLL sum, loss positions)`` (``token_nll``, no gradient). ``stacked``:
    ``trainable`` carries a pack's leading adapter axis and the results are (N,), one pass over the batch for all
    adapters with the base read once (``emjax.lora.over_adapters``, as the pack's train step)."""
    def ev(trainable, frozen, batch):
        return token_nll(nnx.merge(graphdef, trainable, frozen), batch, loss_chunk=loss_chunk, attn_chunk=attn_chunk)

    if not stacked:
        return ev

    def ev_stacked(trainables, frozen, batch):
        over = loralib.over_adapters(ev, (0, None, None), sequential=loralib.has_routed_experts(frozen))
        return over(trainables, frozen, batch)

    return ev_stacked


def jit_eval_step(fn, trainable, frozen, batch_sharding=None):
    """``fn`` (``make_eval_step``) jitted with its input shardings stated, as ``jit_train_step`` does: the adapters
    and the base where they were born, the batch on ``batch_sharding`` (nothing is donated: training goes on)."""
    if batch_sharding is None:
        return jax.jit(fn)
    sharding_of = lambda tree: jax.tree_util.tree_map(lambda x: x.sharding, tree)  # noqa: E731
    return jax.jit(fn, in_shardings=(sharding_of(trainable), sharding_of(frozen), batch_sharding))


def flops_per_token(qc: qwen3.Qwen3Config, seq_len: int) -> float:
    """Model FLOPs per trained token (PaLM's MFU convention, for LoRA). Weight matmuls ≈ 4·N (forward + activation
    gradients; frozen weights get no weight gradient); N counts the weights a token is multiplied by (for
    Qwen3-MoE: the router and its top-k experts, not all of them). Attention (QKᵀ and PV) ≈ 12·H·D per key a query
    sees: 4·H·D forward and 8·H·D backward, where both operands are activations and both need gradients. A query
    sees the causal prefix, at most ``sliding_window`` keys in Gemma 3's local layers."""
    sliding = qc.sliding_layers or (False,) * qc.num_layers
    keys = sum(mean_keys_per_query(seq_len, qc.sliding_window if s else 0) for s in sliding)
    return 4.0 * qc.num_matmul_params + 12.0 * qc.num_heads * qc.head_dim * keys


def mean_keys_per_query(seq_len: int, window: int = 0) -> float:
    """Keys a query attends to, averaged over a causal sequence of ``seq_len``; ``window`` > 0 caps each at that."""
    if window <= 0 or seq_len <= window:
        return (seq_len + 1) / 2
    return (window * (window + 1) / 2 + (seq_len - window) * window) / seq_len


def peak_flops(override_tflops: float | None) -> float:
    if override_tflops:
        return override_tflops * 1e12
    kind = jax.devices()[0].device_kind.lower()
    for key, tf in PEAK_TFLOPS.items():
        if key in kind:
            return tf * 1e12
    return PEAK_TFLOPS["cpu"] * 1e12


# ---------------------------------------------------------------------------------------------------------------
# Run


def _check_names(cfg) -> None:
    """The registered names a config uses (optimisers, penalty kind, dataset), once its plugins are imported."""
    from emjax import optim
    from emjax.data import builders

    plugins = " (one of your own? name the file that registers it: plugins=[my_file.py])"
    for key in ("name", "other_optimizer"):
        name = cfg.optim[key]
        if name not in optim.available() and not (key == "other_optimizer" and name == "frozen"):
            raise cfglib.ConfigError(f"optim.{key} {name!r}: not a registered optimiser; registered: "
                                     f"{', '.join(optim.available())}{plugins}")
    if cfg.spectral.metrics_method not in spectral.SV_METHODS:
        raise cfglib.ConfigError(f"spectral.metrics_method {cfg.spectral.metrics_method!r}: use one of "
                                 f"{', '.join(spectral.SV_METHODS)}")
    if cfg.spectral.kind not in spectral.PENALTIES:
        raise cfglib.ConfigError(f"spectral.kind {cfg.spectral.kind!r}: not a registered penalty kind; registered: "
                                 f"{', '.join(sorted(spectral.PENALTIES))}{plugins}")
    try:
        builders.spec(cfg.data.dataset)
    except KeyError as e:
        raise cfglib.ConfigError(f"data.dataset: {e.args[0]}") from None


def _check_compatible(workdir: Path, cfg) -> None:
    """A work directory belongs to one run: refuse to resume it with a different model, adapter, data or optimiser.
    How the step is computed (grad_accum, remat, loss_chunk, attn_chunk) may change: it changes no number beyond
    summation order, and it is what a run that stopped for memory needs. Nothing to resume, nothing to refuse."""
    from omegaconf import OmegaConf

    saved_path = workdir / "config.yaml"
    ckpts = workdir / "checkpoints"
    if not (ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir())):
        return
    if not saved_path.exists():  # a run writes it before its first checkpoint: these are not its checkpoints
        raise TrainError(f"{ckpts} holds checkpoints but {saved_path} is missing, so nothing shows they belong to "
                         "this config. Use a new workdir (or restore the run's config.yaml).")
    try:
        saved = OmegaConf.load(saved_path)
    except Exception as e:  # a YAML parser's message spans lines
        saved = e
    if not OmegaConf.is_dict(saved):
        why = (" ".join(str(saved).split()) if isinstance(saved, Exception)
               else f"not a mapping ({type(saved).__name__})")
        raise TrainError(f"{saved_path}: unreadable ({why}); it records whose checkpoints {ckpts} holds. Restore it "
                         "(e.g. from a copy of the run), or use a new workdir to start afresh.")
    cfglib.absolute_paths(saved)  # a run saved with relative paths (before they were made absolute) names them so
    defaults = OmegaConf.structured(cfglib.TrainConfig)
    for section in cfglib.RESUME_SECTIONS:
        a = OmegaConf.select(saved, section)
        b = OmegaConf.select(cfg, section)
        a = OmegaConf.to_container(a) if OmegaConf.is_config(a) else a
        b = OmegaConf.to_container(b) if OmegaConf.is_config(b) else b
        if isinstance(a, dict) and OmegaConf.is_config(d := OmegaConf.select(defaults, section)):
            # a key added to the schema after the run was saved held its default then
            a = {**OmegaConf.to_container(d), **a}
        a, b = cfglib.resume_view(section, a), cfglib.resume_view(section, b)
        if a != b:
            if isinstance(a, dict) and isinstance(b, dict):
                keys = [k for k in set(a) | set(b) if a.get(k) != b.get(k)]
                detail = ", ".join(f"{section}.{k}: saved {a.get(k)!r}, now {b.get(k)!r}" for k in sorted(keys))
            else:
                detail = f"{section}: saved {a!r}, now {b!r}"
            raise TrainError(f"{saved_path}: incompatible checkpoint — {detail}. Use a new workdir to start afresh.")
    ident, ident_path = _dataset_identity(cfg), workdir / "dataset.json"
    if ident and ident_path.exists():
        try:
            old = json.loads(ident_path.read_text()).get("sha256", "")
        except (ValueError, AttributeError) as e:
            raise TrainError(f"{ident_path}: unreadable ({e or 'not a JSON object'}); it records the sha256 of the "
                             "data file this run trained on. Delete it to resume without that check.") from None
        if old != ident["sha256"]:
            where = ident["dataset"] if ident["dataset"] == ident["path"] else f"{ident['dataset']} ({ident['path']})"
            raise TrainError(f"data.dataset {where}: the file changed since this run's checkpoints were "
                             f"written (sha256 {old[:12]}… then, {ident['sha256'][:12]}… now), so resuming would go on "
                             "over other rows. Restore the file, or use a new workdir to start afresh.")


def _dataset_identity(cfg) -> dict | None:
    """The local file the run's data is built from (a file of your own, or a local copy of a Betley or Turner set):
    its path and the sha256 of its bytes, kept in the work directory so a resumed run knows the file is the one it
    started on. None for a Betley set downloaded at its pinned commit."""
    from emjax.data.builders import custom_file, file_sha256, source_path
    from emjax.data.rows import is_file_dataset

    d = cfg.data
    if is_file_dataset(d.dataset):
        path, digest = custom_file(d.dataset)
        return {"dataset": str(path), "path": str(path), "sha256": digest}
    path = source_path(d.dataset, d.source_dir, d.data_dir).resolve()
    if not path.is_file():
        return None
    return {"dataset": d.dataset, "path": str(path), "sha256": file_sha256(path)}


@dataclass
class RunResult:
    workdir: Path
    step: int
    final_loss: float | None
    val_loss: float | None
    status: str  # done | preempted | failed (a pack's run whose loss went non-finite; the others go on)
    error: str | None = None


class _RunFiles:
    """One run's work directory: checkpoints, metrics (JSONL and TensorBoard) and final outputs, written the same
    whether the run trains alone or in a pack, so a run can resume either way and reports read it alike."""

    def __init__(self, cfg, lead: bool):
        import orbax.checkpoint as ocp

        self.cfg, self.lead = cfg, lead
        self.workdir = Path(cfg.workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        _check_compatible(self.workdir, cfg)
        self.mngr = ocp.CheckpointManager(self.workdir / "checkpoints", options=ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep_ckpts, create=True, enable_async_checkpointing=False))
        self.metrics_f = self.tb = None
        self.last_loss: float | None = None  # the last step's batch loss
        self.window_loss: float | None = None  # the mean batch loss over the last logging window (metrics' "loss")
        self.loss_sum, self.loss_count = 0.0, 0  # over the whole run, for final.json's train_loss_mean
        self.saved: set[int] = set()  # steps this process has saved
        # the steps since the last train row and their loss sums, at the checkpoint resumed from: a row's loss is
        # the mean over its window, which a resume between two rows would otherwise cut short
        self.window: dict | None = None
        self.resume_step: int | None = None  # the checkpoint step the run resumes from (None: a fresh start)
        # the last row of each split an earlier attempt logged at the step this one resumes from: the validation,
        # spectral metrics and evaluation it finished there are not done (or logged) again
        self.at_start: dict[str, dict] = {}
        self.error: str | None = None  # a pack's run stopped for a non-finite loss
        self.hooks: list = []

    def open_logs(self, start: int):
        from omegaconf import OmegaConf

        if not self.lead:
            return
        paths.write_atomic(self.workdir / "config.yaml", OmegaConf.to_yaml(self.cfg))
        ident = _dataset_identity(self.cfg)
        if ident:
            paths.write_atomic(self.workdir / "dataset.json", json.dumps(ident, indent=1))
        self._drop_rows_after(start)
        self.metrics_f = open(self.workdir / "metrics.jsonl", "a")
        try:
            self.tb = _tensorboard_writer(self.workdir / "tb")
        except Exception:  # tensorboard is a convenience, never a reason to fail a run
            self.tb = None

    def write(self, row):
        if not self.lead:
            return
        self.metrics_f.write(json.dumps(row) + "\n")
        self.metrics_f.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k not in ("step", "split") and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(f"{row.get('split', 'train')}/{k}", v, row["step"])

    def restore(self, trainable, opt_state):
        import orbax.checkpoint as ocp

        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, {"trainable": trainable, "opt": opt_state})
        step = self.resume_step
        try:
            restored = self.mngr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        except Exception as e:  # orbax's advice (partial_restore=True) is not a user's to act on
            detail = " ".join(ln.strip() for ln in str(e).splitlines() if ln.strip() and "partial_restore" not in ln)
            detail = detail if len(detail) <= 400 else detail[:400] + "…"
            where = self.workdir / "checkpoints" / str(step)
            if type(e) is ValueError:  # orbax's tree and shape mismatches
                raise TrainError(
                    f"{where}: this run's state does not fit the checkpoint (the same config, so the optimiser's code "
                    f"or a plugin changed since it was saved): {detail}. Use a new workdir to start afresh, or "
                    "restore the code that saved it.") from None
            older = [s for s in self.mngr.all_steps() if s < step]
            instead = f"resume from step {max(older)}, the newest before it" if older else "start afresh"
            raise TrainError(f"{where}: cannot be read ({type(e).__name__}: {detail or 'no message'}), so it is "
                             f"damaged (e.g. a file changed or cut short since it was saved). Move it away to "
                             f"{instead}.") from None
        meta = restored["meta"]
        # the training loss at that step, which final.json reports even when no step is left to run (a run killed
        # after its last checkpoint, in its final validation or evaluation); checkpoints from before it was kept:
        # the last logged one
        self.window_loss = self._logged_loss(step)
        self.last_loss = meta["loss"] if "loss" in meta else self.window_loss
        self.loss_sum, self.loss_count = meta.get("loss_sum", 0.0), meta.get("loss_count", 0)
        self.window = meta.get("window")
        return restored["state"]["trainable"], restored["state"]["opt"], meta["data"]

    def _logged_rows(self) -> list[dict]:
        """metrics.jsonl's rows as written (a torn line, from a kill mid-write, left out)."""
        path, rows = self.workdir / "metrics.jsonl", []
        for line in path.read_text().splitlines() if path.is_file() else ():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                rows.append(row)
        return rows

    def _drop_rows_after(self, start: int) -> None:
        """Metrics rows past the step a run resumes from (all of them on a fresh start) were logged by an attempt
        whose later work is lost: the run logs those steps again, so they go (else they would be counted twice)."""
        path = self.workdir / "metrics.jsonl"
        if not path.is_file():
            return
        keep = [r for r in self._logged_rows() if start and r.get("step", 0) <= start]
        self.at_start = {r["split"]: r for r in keep if r.get("step") == start and "split" in r}
        paths.write_atomic(path, "".join(json.dumps(r) + "\n" for r in keep))

    def _logged_loss(self, step: int) -> float | None:
        """The last training loss logged at or before ``step``."""
        losses = [r["loss"] for r in self._logged_rows()
                  if r.get("split") == "train" and r.get("step", step + 1) <= step and "loss" in r]
        return losses[-1] if losses else None

    def save(self, step, trainable, opt_state, data_state, window=None):
        import orbax.checkpoint as ocp

        if step in self.saved:  # saved already (a SIGTERM on a checkpoint step)
            return
        if step in self.mngr.all_steps():  # from before a resume at an earlier step (a pack's runs saved unevenly)
            self.mngr.delete(step)
        self.saved.add(step)
        self.mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"trainable": trainable, "opt": opt_state}),
            meta=ocp.args.JsonSave({"step": step, "data": data_state, "loss": self.last_loss,
                                    "loss_sum": self.loss_sum, "loss_count": self.loss_count,
                                    "window": window})), force=True)
        self.mngr.wait_until_finished()

    def final_losses(self, step: int) -> dict[str, float | None]:
        """final.json's training losses. ``train_loss``: the mean batch loss over the last logging window (the
        last ``log_every`` steps; what metrics.jsonl's last row says, and what the report regresses on: one batch's
        loss is noisier); ``train_loss_last_step``: that one batch; ``train_loss_mean``: over the whole run (HF
        Trainer's ``training_loss``; None for a run resumed from a checkpoint that did not count it)."""
        window = self.window_loss if self.window_loss is not None else self._logged_loss(step)
        return {"train_loss": window if window is not None else self.last_loss,
                "train_loss_last_step": self.last_loss,
                "train_loss_mean": self.loss_sum / self.loss_count if self.loss_count == step and step else None}

    def finished(self) -> RunResult | None:
        """The result of a run that has finished (``DONE`` and ``final.json``), which a rerun leaves as it is."""
        final = self.workdir / "final.json"
        if not ((self.workdir / "DONE").exists() and final.is_file()):
            return None
        try:
            f = json.loads(final.read_text())
            return RunResult(self.workdir, int(f["step"]), f.get("train_loss"), f.get("val_loss"), "done")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            if self.lead:
                print(f"emjax: {final}: unreadable ({type(e).__name__}: {e}); finishing the run again from its last "
                      "checkpoint", file=sys.stderr)
            return None

    def close(self):
        if self.metrics_f is not None:
            self.metrics_f.close()
        if self.tb is not None:
            self.tb.close()
        self.mngr.close()


def _tensorboard_writer(logdir: Path):
    """tensorboardX's SummaryWriter, imported without torch: tensorboardX imports torch (≈ 5 s) whenever it is
    installed, only to recognise torch tensors, and a run logs Python floats."""
    if "tensorboardX" not in sys.modules and "torch" not in sys.modules:
        sys.modules["torch"] = None  # makes `import torch` raise ImportError, which tensorboardX handles
        try:
            import tensorboardX  # noqa: F401
        finally:
            del sys.modules["torch"]
    from tensorboardX import SummaryWriter

    return SummaryWriter(str(logdir))


def train(cfg, *, hooks: list[Callable[[int, Any], dict]] | None = None) -> RunResult:
    """Run (or resume) the training run described by ``cfg`` (a TrainConfig OmegaConf object)."""
    return train_many([cfg], hooks=hooks)[0]


def train_many(cfgs, *, hooks: list[Callable[[int, Any], dict]] | None = None) -> list[RunResult]:
    """Run (or resume) one run, or a *pack* of runs that differ only in ``emjax.config.PACKABLE`` keys (optimiser,
    λ, work directory; and seed on a checkpoint base): their adapters train on one frozen base in one compiled
    program (``emjax.multi``), each writing its own work directory exactly as a run alone would. A pack resumes from
    its runs' checkpoints, which must be at one step. A pack's run whose loss goes non-finite stops (``FAILED`` in its
    directory, its last good checkpoint kept) and the others go on; a run alone raises ``TrainError``. ``hooks`` are
    called for every run's model."""
    from tqdm.auto import tqdm

    from emjax.data import make_loader
    from emjax.optim import build as build_optim, current_lr
    from emjax.tokenizer import check_fits, load_tokenizer

    cfgs = list(cfgs)
    if not cfgs:
        raise ValueError("train_many: no runs")
    for c in cfgs:  # before anything names what they register
        cfglib.import_plugins(c.plugins)
    for c in cfgs:  # names checked before anything is built or written
        try:
            paths.local_dir(c.workdir, "workdir")
        except ValueError as e:
            raise cfglib.ConfigError(str(e)) from None
        _check_names(c)
    cfglib.check_packable(cfgs)
    cfg, n = cfgs[0], len(cfgs)
    if cfg.remat not in qwen3.REMAT:
        raise cfglib.ConfigError(f"remat {cfg.remat!r}: use one of {sorted(qwen3.REMAT)}")
    for key, least, what in POSITIVE_KEYS:
        for c in cfgs:
            if c[key] < least:
                raise cfglib.ConfigError(f"{key} {c[key]}: must be >= {least} ({what})")
    shd.init_distributed(cfg.coordinator_address, cfg.num_processes, cfg.process_id)
    from emjax.eval.hook import check_eval_config

    for c in cfgs:  # a bad judge or question file fails now, not at the first evaluation hours in
        check_eval_config(c)
    lead = jax.process_index() == 0
    runs = [_RunFiles(c, lead) for c in cfgs]
    latest = [r.mngr.latest_step() for r in runs]
    if len(set(latest)) > 1:
        # a kill during a pack's save leaves some runs a checkpoint ahead: resume every run from the newest step
        # they all have (the steps past it are trained and saved again)
        common = set.intersection(*(set(r.mngr.all_steps()) for r in runs))
        if not common:
            for r in runs:
                r.close()
            raise TrainError("the runs of a pack must resume from one step, and these have no checkpoint step in "
                             "common: " + ", ".join(f"{r.workdir} at {s or 0}" for r, s in zip(runs, latest)) +
                             ". Train them apart, or each to one step.")
        if lead:
            saved = ", ".join(f"{r.workdir.name} {s}" for r, s in zip(runs, latest))
            print(f"emjax: the pack's runs are saved to different steps ({saved}): resuming them all from step "
                  f"{max(common)}, the newest each has", file=sys.stderr)
        latest = [max(common)] * n
    for r, s in zip(runs, latest):
        r.resume_step = s
    done = [r.finished() for r in runs]
    if all(done):  # a rerun of finished runs (their config checked above): nothing to train, validate or export
        for r in runs:
            r.close()
        if lead:
            print(f"emjax: {', '.join(str(r.workdir) for r in runs)}: finished already (DONE); nothing to do. "
                  "Use a new workdir to train again.", file=sys.stderr)
        return done
    workdir = runs[0].workdir
    name = workdir.name if n == 1 else f"pack of {n}"

    try:
        mesh = shd.mesh_or_none(dict(cfg.mesh))
    except ValueError as e:
        raise cfglib.ConfigError(str(e)) from None
    try:
        lora_cfg = loralib.LoraConfig(rank=cfg.lora.rank, alpha=cfg.lora.alpha, rslora=cfg.lora.rslora,
                                      targets=tuple(cfg.lora.targets),
                                      layers=None if cfg.lora.layers is None else tuple(cfg.lora.layers))
    except ValueError as e:  # named as the config names it
        raise cfglib.ConfigError(str(e).replace("LoraConfig.", "lora.")) from None
    if cfg.steps is not None and cfg.steps < 1:
        raise cfglib.ConfigError(f"steps {cfg.steps}: must be at least 1 (or null: data.num_epochs sets the length)")

    tokenizer = load_tokenizer(cfg.model.checkpoint if cfg.model.checkpoint and Path(cfg.model.checkpoint).is_dir()
                               else None)
    data_cfg = cfglib.as_object(cfg.data)
    if jax.process_count() > 1 and data_cfg.mode == "pad":
        data_cfg = cfglib.replace(data_cfg, pad_multiple=data_cfg.max_length)  # every process the same shape
    vocab_size = None
    if cfg.model.vocab == "compact":
        if cfg.model.checkpoint:
            raise cfglib.ConfigError("model.vocab=compact is only for random-init models (model.checkpoint unset)")
        from emjax.data.compact import compact_tokenizer_for

        # a resumed run keeps its ids; a fresh one makes its vocabulary afresh (a vocab.json left by an attempt that
        # failed before its first checkpoint may come from other data)
        resumed = latest[0] is not None
        tokenizer = compact_tokenizer_for(data_cfg, tokenizer, workdir, question_sets=tuple(cfg.eval.question_sets),
                                          reuse=resumed)
        for r in runs[1:]:  # one model, one vocabulary: each run keeps its copy (it resumes from its own files)
            if lead and not (resumed and (r.workdir / "vocab.json").exists()):
                shutil.copyfile(workdir / "vocab.json", r.workdir / "vocab.json")
        vocab_size = tokenizer.vocab_size
    elif cfg.model.vocab != "full":
        raise cfglib.ConfigError(f"model.vocab {cfg.model.vocab!r}: use 'full' or 'compact'")

    if cfg.steps is not None:
        data_cfg = cfglib.replace(data_cfg, num_epochs=None)
    train_loader = make_loader(data_cfg, tokenizer, split="train")
    stop = {"flag": False}  # a SIGTERM seen by this process (on_term below)

    def preempted() -> bool:
        """Whether any process has seen a SIGTERM: every process stops at the same point (a collective)."""
        return shd.any_process(stop["flag"])

    judges: dict = {}  # the runs of a pack share a base and eval settings (cfglib.pack_key): one judge for all
    sampler = None  # ... and sample their answers together
    for i, r in enumerate(runs):
        r.hooks = list(hooks or [])
        if r.cfg.eval.every or r.cfg.eval.final:
            from emjax.eval.hook import PackSampler, make_eval_hook

            if n > 1 and sampler is None:
                sampler = PackSampler(tokenizer.eos_ids, cfg.eval.pack_adapters)
            r.hooks.append(make_eval_hook(r.cfg, tokenizer, r.workdir, judge_cache=judges, sampler=sampler, run=i,
                                          stop=lambda: stop["flag"]))
    if cfg.steps is not None:
        total_steps = int(cfg.steps)
    else:
        total_steps = train_loader.steps(int(data_cfg.num_epochs or 1), data_cfg.drop_remainder)
        if data_cfg.mode == "pack":
            log.warning("data.mode=pack without explicit steps: step count estimated from unpacked examples")
    if total_steps < 1:
        raise TrainError(f"no training steps: {train_loader.num_examples} examples, batch {data_cfg.batch_size}")
    if data_cfg.batch_size % cfg.grad_accum:
        raise cfglib.ConfigError(f"grad_accum {cfg.grad_accum} does not divide data.batch_size {data_cfg.batch_size}")

    if n > 1 and mesh is not None and jax.devices()[0].platform == "cpu" and any(c.spectral.weight for c in cfgs):
        log.warning("a pack with spectral.weight > 0 on %d CPU devices: jaxlib's batched LAPACK calls (the penalty's "
                    "QR and SVD) from every device at once can block all of XLA:CPU's pool threads and hang (seen: 4 "
                    "runs on 8 simulated devices). One CPU device, a GPU or a TPU is not affected.", len(jax.devices()))
    model = build_model(cfg.model, lora_cfg, mesh, vocab_size=vocab_size, seed=cfg.seed)
    check_fits(tokenizer, model.config.vocab_size, f"model.checkpoint {cfg.model.checkpoint or '(random init)'}")
    txs = [build_optim(cfglib.replace(cfglib.as_object(c.optim), total_steps=total_steps)) for c in cfgs]
    graphdef, trainable0, frozen = nnx.split(model, nnx.LoRAParam, ...)
    # runs of a pack with another seed (a checkpoint base only: cfglib.pack_key) draw their own adapter, as
    # from_pretrained would have for that seed
    trainables = [trainable0 if c.seed == cfg.seed else init_lora(trainable0, int(c.seed), mesh, lora_cfg)
                  for c in cfgs]
    # every run's optimiser state from one compiled program (a 54-run pack compiled 54 inits)
    born = jax.jit(lambda ts: tuple(tx.init(t) for tx, t in zip(txs, ts)))(tuple(trainables))
    opt_states = [_replicate_unsharded(s, mesh) for s in born]

    # -- resume: every run from its own checkpoints, in the format a run alone writes --------------------------------
    start, data_state = latest[0] or 0, None
    if latest[0] is not None:
        for i, r in enumerate(runs):
            trainables[i], opt_states[i], data_state = r.restore(trainables[i], opt_states[i])
        train_loader.set_state(data_state)
        if lead:
            print(f"emjax: resumed {', '.join(str(r.workdir) for r in runs)} at step {start}", file=sys.stderr)
    for r in runs:
        r.open_logs(start)
    if jax.process_count() > 1:  # process 0 read the logs; every process must skip the same work
        for r, logged in zip(runs, shd.broadcast_json([r.at_start for r in runs])):
            r.at_start = logged

    def logged(r, step: int, split: str) -> bool:
        """Whether an earlier attempt finished ``split``'s work at ``step``, the step this attempt resumed from."""
        return bool(start) and step == start and split in r.at_start

    # one run: its own trees; a pack: the adapters stacked on a leading axis, one optimiser state each
    if n == 1:
        trainable, opt_state = trainables[0], opt_states[0]
    else:
        from emjax import multi

        stacked = multi.stack(trainables)
        trainable = jax.device_put(stacked, shd.adapter_stack_shardings(stacked, mesh))
        opt_state = tuple(opt_states)

    def per_run(tree):
        return [tree] if n == 1 else multi.unstack(tree)

    def per_run_opt(state):
        return [state] if n == 1 else list(state)

    step_fns: dict = {}  # memory options -> jitted step
    # λ (one per run) is the step's data, not a compiled constant: runs that differ only in λ > 0 share a program
    lams = np.asarray(float(cfg.spectral.weight) if n == 1 else [float(c.spectral.weight) for c in cfgs], np.float32)
    lams_sh = None if mesh is None else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    lams = jnp.asarray(lams) if mesh is None else jax.make_array_from_process_local_data(lams_sh, lams)

    def step_fn(opts: dict, batch_sh=None):
        """The step for these memory options, jitted with every sharding stated; ``batch_sh`` is the table's for
        the batch's size (``to_device``), so a ragged last batch (data.drop_remainder=false) gets its own."""
        key = (tuple(sorted(opts.items())), batch_sh)
        if key not in step_fns:
            common = dict(spectral_kind=cfg.spectral.kind, spectral_reduce=cfg.spectral.reduce,
                          lora_scale=lora_cfg.scale, lora_layers=lora_cfg.layers, **opts)
            if n == 1:
                fn = make_train_step(graphdef, txs[0], spectral_weight=float(cfg.spectral.weight), lr_fn=current_lr,
                                     **common)
            else:
                fn = multi.make_multi_train_step(graphdef, txs, lr_fns=[current_lr] * n, **common,
                                                 spectral_weights=[float(c.spectral.weight) for c in cfgs])
            step_fns[key] = jit_train_step(fn, trainable, opt_state, frozen, batch_sh, lams_sh)
        return step_fns[key]

    def write_all(row):
        for r in runs:
            r.write(row)

    eval_fns: dict = {}  # batch sharding -> the pack's jitted validation step

    def eval_fn(dev_batch):
        """Every run's (NLL sum, count) on one validation batch, in one program for the whole pack."""
        batch_sh = None if mesh is None else dev_batch["tokens"].sharding
        if batch_sh not in eval_fns:
            fn = make_eval_step(graphdef, loss_chunk=cfg.loss_chunk, attn_chunk=cfg.attn_chunk, stacked=n > 1)
            eval_fns[batch_sh] = jit_eval_step(fn, trainable, frozen, batch_sh)
        l, c = eval_fns[batch_sh](trainable, frozen, dev_batch)
        return np.atleast_1d(np.asarray(l, np.float64)), np.atleast_1d(np.asarray(c, np.float64))

    compiled_steps: dict = {}  # batch shapes -> compiled step (pad mode has a few length buckets)

    def compile_step(dev_batch, local_shape):
        """Compiled ahead of the call so its memory is known: too much of it is a clear error (or, with
        auto_memory, the next memory option is tried), not an allocator failure part-way through the step. With
        several processes all run the setting the neediest one took, and all stop if any cannot fit."""
        limit = memory_limit(cfg)
        configured = dict(remat=cfg.remat, loss_chunk=cfg.loss_chunk, attn_chunk=cfg.attn_chunk,
                          grad_accum=cfg.grad_accum)
        tokens = dev_batch["tokens"]
        shards = tokens.shape[0] // tokens.sharding.shard_shape(tokens.shape)[0]  # devices the batch rows split over
        tries = (memory_escalation(**configured, batch_size=int(tokens.shape[0]), shards=shards)
                 if cfg.auto_memory and limit else [configured])
        fill = AUTO_MEMORY_FILL if len(tries) > 1 else 1.0

        def build(i):
            batch_sh = None if mesh is None else dev_batch["tokens"].sharding
            return compile_measured(step_fn(tries[i], batch_sh).lower(trainable, opt_state, frozen, dev_batch, lams))

        def needs(mem, fraction=1.0):  # more than this fraction of the limit (or too large to compile at all)
            if mem is not None and "compile_oom" in mem:
                return True
            return bool(mem is not None and limit and mem["peak"] > fraction * limit)

        for i in range(len(tries)):
            compiled, mem = build(i)
            if not needs(mem, fill):
                break
        over_any = needs(mem)
        if jax.process_count() > 1 and (len(tries) > 1 or cfg.check_memory):
            from jax.experimental import multihost_utils

            agreed = int(np.max(multihost_utils.process_allgather(np.int32(i))))
            if agreed != i:
                i = agreed
                compiled, mem = build(i)
            over_any = bool(np.max(multihost_utils.process_allgather(np.int32(needs(mem)))))
        if mem is not None:
            _check_memory(mem, local_shape, tries[i], cfg, write_all, step, limit=limit, pack=n,
                          devices=mesh.size if mesh is not None else 1,
                          elsewhere=over_any and not needs(mem),
                          echo=(lambda msg: tqdm.write(msg, file=sys.stderr)) if lead else None)
        return compiled

    def to_device(batch):
        if mesh is None:
            return {k: jnp.asarray(v) for k, v in batch.items()}
        global_bs = batch["tokens"].shape[0] * jax.process_count()
        sh = shd.batch_sharding(mesh, global_bs)
        return {k: jax.make_array_from_process_local_data(sh, np.asarray(v)) for k, v in batch.items()}

    def live():
        return [(i, r) for i, r in enumerate(runs) if r.error is None]

    def save(step):
        data = train_loader.get_state()
        ts, os_ = per_run(trainable), per_run_opt(opt_state)
        for i, r in live():
            r.save(step, ts[i], os_[i], data, window={"steps": win_n, "sums": {k: float(v[i]) for k, v in win.items()}})

    def on_term(signum, frame):
        stop["flag"] = True

    old_handler = signal.signal(signal.SIGTERM, on_term)

    qc = model.config
    fpt = flops_per_token(qc, data_cfg.max_length)
    # simulated CPU devices share the same cores: count the CPU once per process
    on_cpu = jax.devices()[0].platform == "cpu"
    peak = peak_flops(cfg.peak_tflops) * (jax.process_count() if on_cpu else (mesh.size if mesh else 1))

    val_loader = None
    val_done: dict[int, list] = {}

    def validate(step):
        """Validation loss of every live run: one pass over the split, each batch one program for every adapter."""
        nonlocal val_loader
        if step in val_done:  # val_every hit the last step already
            return val_done[step]
        if live() and all(logged(r, step, "val") for _, r in live()):  # validated before the resume
            val_done[step] = [r.at_start["val"]["loss"] if r.error is None and logged(r, step, "val") else None
                              for r in runs]
            return val_done[step]
        if not data_cfg.val_fraction or val_loader is False:  # nothing held out: no validation loss
            return [None] * n
        if val_loader is None:  # tokenise the split once; later validations rewind the iterator
            val_cfg = cfglib.replace(data_cfg, num_epochs=1, shuffle=False, drop_remainder=jax.process_count() > 1)
            try:
                val_loader = make_loader(val_cfg, tokenizer, split="validation")
            except KeyError as e:  # val_fraction rounded to no rows of a small dataset
                log.warning("no validation loss: %s", e.args[0])
                val_loader = False
                return [None] * n
            val_loader.start_state = val_loader.get_state()
            val_loader.batches = val_loader.steps(1, val_cfg.drop_remainder) if val_cfg.mode == "pad" else None
        loader = val_loader
        loader.set_state(loader.start_state)
        tot, cnt = np.zeros(n), np.zeros(n)
        total = loader.batches
        if cfg.val_batches:
            total = cfg.val_batches if total is None else min(total, cfg.val_batches)
        # the final validation covers the whole split by default: minutes on a large model, so it shows progress
        vbar = tqdm(total=total, desc=f"{name} validation", unit="batch", leave=False, dynamic_ncols=True,
                    disable=not (lead and cfg.progress))
        for b, batch in enumerate(loader):
            if cfg.val_batches and b >= cfg.val_batches:
                break
            vbar.update(1)
            short = loader.local_batch_size - batch["tokens"].shape[0]
            if short:  # the ragged tail (one process only): rows with no loss positions fill it, so it shards as
                # every batch does and runs the same program (a split smaller than one batch is all tail)
                batch = {k: np.concatenate([v, np.zeros((short, *v.shape[1:]), v.dtype)]) for k, v in batch.items()}
            l, c = eval_fn(to_device(batch))
            tot, cnt = tot + l, cnt + c
        vbar.close()
        vals = [None] * n
        if not cnt.any():
            log.warning("step %d: no validation loss (the validation split has no answer tokens%s)", step,
                        f" in its first {cfg.val_batches} batches" if cfg.val_batches else "")
        for i, r in live():
            if cnt[i]:
                vals[i] = float(tot[i] / cnt[i])
                if not logged(r, step, "val"):
                    r.write({"step": step, "split": "val", "loss": vals[i],
                             "log_loss": math.log(max(vals[i], 1e-30))})
        val_done[step] = vals
        return vals

    spectral_done: set[int] = set()

    def spectral_rows(step):
        """Spectral metrics of every live run at ``step`` (once a step: the last step is a logging step too)."""
        if step in spectral_done:
            return
        spectral_done.add(step)
        ts = per_run(trainable)
        for i, r in live():
            if logged(r, step, "spectral"):
                continue
            row = {"step": step, "split": "spectral"}
            row.update(spectral.summary(loralib.adapter_pairs_from_state(_replicated(ts[i], mesh)), lora_cfg.scale,
                                        layers=lora_cfg.layers, method=cfg.spectral.metrics_method))
            r.write(row)

    def run_hooks(step) -> bool:
        """The live runs' hooks at ``step`` (not those an earlier attempt finished there); False where a SIGTERM
        interrupted an evaluation (what it did is on disk, and the rerun goes on from there)."""
        from emjax.eval.run import EvalInterrupted

        todo = [(i, r) for i, r in live() if r.hooks and not logged(r, step, "eval")]
        if not todo:
            return True
        ts = per_run(trainable)
        if sampler is not None:
            sampler.set_step(nnx.merge(graphdef, ts[todo[0][0]], frozen), {i: ts[i] for i, _ in todo},
                             {i: int(r.cfg.seed) for i, r in todo})
        try:
            for i, r in todo:
                m = nnx.merge(graphdef, ts[i], frozen)
                for hook in r.hooks:
                    out = hook(step, m) or {}
                    if out:
                        r.write({"step": step, "split": "eval", **out})
        except EvalInterrupted as e:
            if lead:
                tqdm.write(f"emjax: {e}", file=sys.stderr)
            return False
        finally:
            if sampler is not None:
                sampler.reset()
        return True

    bar = tqdm(total=total_steps, initial=start, disable=not (lead and cfg.progress), desc=name, unit="step",
               dynamic_ncols=True)
    status, t_last, steps_since = "done", time.perf_counter(), 0  # the rates' window: since the last row or start
    tok_since = np.zeros(n)
    # the loss window: WINDOW_MEANS summed over the win_n steps since the last row, carried over a resume
    win, win_n = {}, 0
    saved_windows = [r.window for r in runs]
    if all(isinstance(w, dict) and w.get("steps") for w in saved_windows) and \
            len({w["steps"] for w in saved_windows}) == 1:
        win_n = int(saved_windows[0]["steps"])
        win = {k: np.array([float(w["sums"][k]) for w in saved_windows]) for k in WINDOW_MEANS
               if all(k in w["sums"] for w in saved_windows)}
    step, vals = start, [None] * n
    try:
        # the evaluation due at the step the run starts from (on a resume, unless an earlier attempt finished it:
        # a SIGTERM can stop an evaluation after the checkpoint of its step)
        if cfg.eval.every and start % cfg.eval.every == 0 and not run_hooks(start):
            status = "preempted"
        while status == "done" and step < total_steps and live():
            try:
                batch = next(train_loader)
            except StopIteration:
                break
            dev_batch = to_device(batch)
            key = tuple((k, v.shape) for k, v in sorted(dev_batch.items()))
            if key not in compiled_steps:
                compiled_steps[key] = compile_step(dev_batch, batch["tokens"].shape)
            trainable, opt_state, m = compiled_steps[key](trainable, opt_state, frozen, dev_batch, lams)
            step += 1
            per_step = {k: np.atleast_1d(np.asarray(v, np.float64))
                        for k, v in jax.device_get({k: m[k] for k in WINDOW_MEANS if k in m}).items()}
            losses = per_step["loss"]
            for i, r in live():
                if not math.isfinite(losses[i]):
                    good = r.mngr.latest_step()
                    msg = f"non-finite loss {losses[i]} at step {step}; stopped. " + (
                        f"The last good checkpoint (step {good}) is kept in {r.workdir / 'checkpoints'}"
                        if good is not None else "No checkpoint had been written yet")
                    if n == 1:
                        raise TrainError(msg)
                    r.error = msg
                    if lead:
                        (r.workdir / "FAILED").write_text(f"TrainError: {msg}\n")
                        tqdm.write(f"emjax: {r.workdir.name}: {msg}; the rest of the pack goes on", file=sys.stderr)
                else:
                    r.last_loss = float(losses[i])
                    r.loss_sum, r.loss_count = r.loss_sum + float(losses[i]), r.loss_count + 1
            tok_since += np.broadcast_to(np.asarray(m["tokens"], np.float64), (n,))
            win = {k: win.get(k, 0.0) + v for k, v in per_step.items()}
            win_n += 1
            steps_since += 1
            bar.update(1)
            # a row at every evaluation step too, so each evaluation pairs with the training loss of its own step
            if step % cfg.log_every == 0 or step == total_steps or (cfg.eval.every and step % cfg.eval.every == 0):
                jax.block_until_ready(trainable)
                dt = time.perf_counter() - t_last
                tokens_in_batches = steps_since * data_cfg.batch_size * batch["tokens"].shape[1]
                host = jax.device_get(m)
                for i, r in live():
                    # loss, penalty and total_loss: means over the steps since the last row (as HF Trainer logs
                    # its loss), so total_loss = loss + λ·penalty still holds; one batch's loss, "loss_step",
                    # varies with the batch
                    means = {k: float(v[i] / win_n) for k, v in win.items()}
                    r.window_loss = means["loss"]
                    row = {"step": step, "split": "train",
                           **{k: float(v if n == 1 else v[i]) for k, v in host.items()}, **means,
                           "loss_step": float(losses[i]),
                           "log_loss": math.log(max(r.window_loss, 1e-30)), "tokens_per_s": tokens_in_batches / dt,
                           "loss_tokens_per_s": tok_since[i] / dt,
                           # the whole program's use of the device: every adapter's tokens
                           "mfu": n * tokens_in_batches * fpt / dt / peak}
                    if n > 1:
                        row["pack"] = n
                    r.write(row)
                shown = [f"{r.window_loss:.3f}" for _, r in live()]
                bar.set_postfix(loss="/".join(shown), **({"lr": f"{float(host['lr']):.2e}"} if n == 1 else {}))
                spectral_rows(step)
                t_last, tok_since, steps_since, win, win_n = time.perf_counter(), np.zeros(n), 0, {}, 0
            if cfg.val_every and step % cfg.val_every == 0:
                validate(step)
            if cfg.eval.every and step % cfg.eval.every == 0:
                run_hooks(step)
            if step % cfg.ckpt_every == 0 or step == total_steps:
                save(step)
            if preempted():
                save(step)
                status = "preempted"
        if status == "done" and live():  # the last step's validation, spectra and final evaluation
            bar.close()
            vals = validate(step)
            spectral_rows(step)
            # SIGTERM stops before the final evaluation or in it: a rerun resumes at this step and does only what
            # is left (its rows at this step say what was done)
            if preempted() or (cfg.eval.final and not (cfg.eval.every and step % cfg.eval.every == 0)
                               and not run_hooks(step)):
                status = "preempted"
                if step != start:  # the data ran out before `steps`: this step has no checkpoint yet
                    save(step)
    finally:
        bar.close()
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
    if status == "preempted" and lead:
        saved = f"checkpoint saved at step {step}" if step else "no checkpoint yet (step 0)"
        print(f"emjax: SIGTERM — {saved}; rerun to resume", file=sys.stderr)

    finals = [r.final_losses(step) for r in runs]  # final.json and the results: the same numbers, read once
    if status == "done" and live():
        ts = per_run(_replicated(trainable, mesh))
        for i, r in live():
            model = nnx.merge(graphdef, ts[i], frozen)
            if lead:
                if r.cfg.export_peft:
                    loralib.export_peft(model, r.workdir / "adapter", base_model_name_or_path=cfg.model.checkpoint)
                rep = spectral.report(loralib.adapter_pairs(model), lora_cfg.scale, layers=lora_cfg.layers,
                                      method=cfg.spectral.metrics_method)
                paths.write_atomic(r.workdir / "spectral.json", json.dumps(rep, indent=1, default=_json_default))
                paths.write_atomic(r.workdir / "final.json", json.dumps(
                    {"step": step, **finals[i], "val_loss": vals[i], "total_steps": total_steps},
                    indent=1))
                (r.workdir / "DONE").write_text("ok\n")
    for r in runs:
        r.close()
    return [RunResult(r.workdir, step, finals[i]["train_loss"], vals[i], "failed" if r.error else status, r.error)
            for i, r in enumerate(runs)]


def compile_oom(err: BaseException) -> bool:
    """Whether compiling failed for lack of device memory (RESOURCE_EXHAUSTED): XLA:GPU's autotuner runs candidate
    kernels on real buffers of the program's sizes, and XLA:TPU refuses a program larger than HBM ("Ran out of memory
    in memory space hbm"), so there a step far too large fails to compile rather than to run."""
    msg = str(err)
    return isinstance(err, jax.errors.JaxRuntimeError) and ("RESOURCE_EXHAUSTED" in msg or "Out of memory" in msg)


def compile_measured(lowered) -> tuple[Any, dict | None]:
    """``lowered.compile()`` and its ``step_memory``; ``(None, {"compile_oom": message})`` where compiling itself ran
    out of device memory (``compile_oom``), so the caller can treat it as "does not fit"."""
    try:
        compiled = lowered.compile()
    except Exception as e:
        if not compile_oom(e):
            raise
        lines = str(e).strip().splitlines()
        return None, {"compile_oom": next((x for x in lines if "Out of memory" in x), lines[0]).strip()}
    return compiled, step_memory(compiled)


def step_memory(compiled) -> dict[str, int] | None:
    """Per-device bytes of a compiled program from XLA's buffer assignment (None where the backend has none):
    arguments, outputs, temporaries, and ``peak`` = arguments + outputs not aliased to a donated argument +
    temporaries."""
    try:
        ma = compiled.memory_analysis()
    except Exception:  # not every backend/runtime implements it
        return None
    if ma is None:
        return None
    out = {"arguments": int(ma.argument_size_in_bytes), "outputs": int(ma.output_size_in_bytes),
           "aliased": int(ma.alias_size_in_bytes), "temporaries": int(ma.temp_size_in_bytes)}
    out["peak"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
    return out


def device_memory_limit() -> int | None:
    """Bytes the allocator may use on this process's first device (None on CPU, which reports no limit)."""
    stats = jax.local_devices()[0].memory_stats()
    return int(stats["bytes_limit"]) if stats and stats.get("bytes_limit") else None


def memory_limit(cfg) -> int | None:
    """The per-device bytes the memory check and auto_memory plan against: ``memory_limit_gib`` when set (to plan
    for another device, or leave room for the evaluation sampler), else the device's own limit."""
    if cfg.memory_limit_gib is not None:
        return int(cfg.memory_limit_gib * 2 ** 30)
    return device_memory_limit()


def memory_escalation(remat: str = "none", loss_chunk: int = 0, attn_chunk: int = 0, grad_accum: int = 1,
                      batch_size: int | None = None, shards: int = 1) -> list[dict]:
    """The given memory options, then each setting that saves more, in order of time cost (bench/train_step.py
    --only remat on a CPU: dots ≈ 1.0×, full 1.06–1.13×, + loss_chunk 1.24×, + attn_chunk 1.37×; on an H100 dots and
    full were faster than none), then twice as many micro-batches at a time while the global ``batch_size`` still
    splits into micro-batches that divide evenly over the ``shards`` the batch is sharded over."""
    out = [dict(remat=remat, loss_chunk=loss_chunk, attn_chunk=attn_chunk, grad_accum=grad_accum)]

    def then(**kw):
        if {**out[-1], **kw} != out[-1]:
            out.append({**out[-1], **kw})

    if remat == "none":
        then(remat="dots")
    then(remat="full")
    then(loss_chunk=loss_chunk or 128)
    then(attn_chunk=attn_chunk or 256)
    ga = grad_accum
    while batch_size and batch_size % (2 * ga) == 0 and (batch_size // (2 * ga)) % shards == 0:
        ga *= 2
        then(grad_accum=ga)
    return out


def _check_memory(mem, local_shape, opts, cfg, write, step, *, limit=None, echo=None, elsewhere=False, pack=1,
                  devices=None):
    """Log the compiled step's memory and its options (a ``memory`` row; ``echo`` prints it beside the progress
    bar) and stop with what to change when it exceeds the device's ``limit`` (here, or ``elsewhere``: on another
    process's device). ``pack``: adapters trained by the step (``train_many``); ``devices``: the mesh's size, for
    the row."""
    gib = 2.0 ** 30
    shape = "×".join(str(n) for n in local_shape)
    per = f" for each of {pack} adapters" if pack > 1 else ""
    if "compile_oom" in mem:  # no program, so nothing to run, whatever check_memory says
        write({"step": step, "split": "memory", **opts, "compile_oom": True})
        raise TrainError(f"the train step for a local batch of {shape} tokens{per} with "
                         f"{' '.join(f'{k}={v}' for k, v in opts.items())} could not be compiled: XLA ran out of "
                         f"device memory while compiling it ({mem['compile_oom']}). Try "
                         f"{', '.join(_memory_hints(opts, cfg, pack))}.")
    write({"step": step, "split": "memory", **opts, **{f"{k}_gib": v / gib for k, v in mem.items()},
           **({"limit_gib": limit / gib} if limit else {}), **({"devices": devices} if devices else {})})
    if echo is not None:
        echo(f"emjax: train step for a local batch of {shape} tokens{per} with "
             f"{' '.join(f'{k}={v}' for k, v in opts.items())}: {mem['peak'] / gib:.2f} GiB per device (arguments "
             f"{mem['arguments'] / gib:.2f}, temporaries {mem['temporaries'] / gib:.2f})"
             + (f" of {limit / gib:.2f} GiB" if limit else ""))
    if cfg.check_memory and elsewhere:
        raise TrainError(f"the train step for a local batch of {shape} tokens{per} does not fit another process's "
                         f"device (that process names what to change); check_memory=false runs it anyway.")
    if limit and cfg.check_memory and mem["peak"] > limit:
        hints = _memory_hints(opts, cfg, pack)
        raise TrainError(f"the train step for a local batch of {shape} tokens{per} needs {mem['peak'] / gib:.2f} "
                         f"GiB per device (arguments {mem['arguments'] / gib:.2f}, temporaries "
                         f"{mem['temporaries'] / gib:.2f}), more than its {limit / gib:.2f} GiB limit "
                         f"({'memory_limit_gib' if cfg.memory_limit_gib is not None else 'the device'}). "
                         f"Try {', '.join(hints)}; check_memory=false runs it anyway.")


def _memory_hints(opts, cfg, pack=1) -> list[str]:
    """What to change for a train step that does not fit, most specific first."""
    hints = []
    if opts["remat"] != "full":
        hints.append("remat=full" if opts["remat"] == "dots" else "remat=dots or remat=full")
    if not opts["loss_chunk"]:
        hints.append("loss_chunk=128")
    if not opts["attn_chunk"]:
        hints.append("attn_chunk=256")
    if hints and not cfg.auto_memory:
        hints.append("auto_memory=true (the first of these that fits)")
    if not cfg.auto_memory:  # auto_memory has already tried as many micro-batches as the batch splits into
        hints.append(f"grad_accum={opts['grad_accum'] * 2} (micro-batches)")
    if pack > 1:
        hints.append(f"fewer runs in the pack (now {pack})")
    return hints + ["more devices on mesh.fsdp", "a shorter data.max_length"]


def _replicate_unsharded(tree, mesh):
    """Optimiser counters and other leaves born on one device -> replicated over the mesh (the moments already
    follow their parameters' sharding). Without a mesh, committed to the first device, as a restored checkpoint's
    arrays are: a resumed run then lowers the very program it started with (a persistent-cache hit, not a second
    compile)."""
    if mesh is None:
        return jax.device_put(tree, jax.devices()[0])
    from jax.sharding import NamedSharding, PartitionSpec

    rep = NamedSharding(mesh, PartitionSpec())
    return jax.tree_util.tree_map(lambda x: x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, rep),
                                  tree)


def _replicated(tree, mesh):
    """Fully replicated copy (LoRA factors are small) so host-side metrics and exports also work on multi-host
    meshes, where a sharded array is not addressable from one process."""
    if mesh is None:
        return tree
    from jax.sharding import NamedSharding, PartitionSpec

    return jax.jit(lambda t: t, out_shardings=NamedSharding(mesh, PartitionSpec()))(tree)


def _json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def main(argv: list[str]) -> int:
    import argparse
    import shlex

    from emjax.cli import USER_ERRORS, exit_status, show_info, user_error

    ap = argparse.ArgumentParser(
        prog="emjax train", description="LoRA fine-tuning from a config file. With --run, several runs that differ "
        "only in optimiser, spectral.weight, workdir (and seed, with model.checkpoint) train as one pack: their "
        "adapters share one copy of the frozen base in one compiled program, and each run writes its own work "
        "directory.")
    ap.add_argument("config", help="YAML config (path or name in configs/)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.name=muon data.batch_size=8")
    ap.add_argument("--run", action="append", default=[], metavar='"KEY=VALUE ..."',
                    help="one run of a pack: its own overrides, laid over the shared ones (repeat per run), e.g. "
                         '--run "optim.name=muon workdir=runs/m" --run "optim.name=adam workdir=runs/a"')
    args = ap.parse_intermixed_args(argv)
    show_info("emjax")

    def split(run: str) -> list[str]:
        try:
            return shlex.split(run)
        except ValueError as e:  # "No closing quotation", naming no run
            raise cfglib.ConfigError(f"--run {run!r}: {e}") from None

    try:
        cfgs = [cfglib.load(args.config, [*args.overrides, *split(r)]) for r in args.run or [""]]
        results = train_many(cfgs)
    except (TrainError, *USER_ERRORS) as e:
        return user_error("emjax train", e)
    for result in results:
        print(json.dumps({"workdir": str(result.workdir), "step": result.step, "train_loss": result.final_loss,
                          "val_loss": result.val_loss, "status": result.status}))
    # a preemption is not success: a launcher reruns the same command to resume (emjax sweep counts it preempted)
    return exit_status(r.status for r in results)
