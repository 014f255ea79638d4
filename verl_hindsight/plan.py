"""Per-GPU memory plan of a recipe: what each part of a run takes on one GPU, whether it fits, and which knob to turn.

    verl-hindsight plan RECIPE [hydra overrides...] --gpus N --gpu-mem GiB [--nnodes 1] [--targeted-frac 1.0]

The recipe is composed exactly as stock ``python -m verl.trainer.main_ppo --config-path <recipes> --config-name
RECIPE overrides`` composes it, checked by verl's ``validate_config`` and the plugin's ``load_hindsight_config``, then
sized with the rules of verl 0.9.1's FSDP engine (``workers/engine/fsdp/transformer_impl.py``,
``workers/engine_workers.py``) and vLLM rollout. Nothing is loaded or downloaded: the model's shape comes from the
``config.json`` of a local model folder, or from a small built-in table of the shipped recipes' default models.

verl runs training and rollout as two phases on the same GPUs: vLLM sleeps (weights and KV cache released) while
the actor trains, and wakes for the rollout while the actor's resident state stays on the GPU. The plan reports
both phases; the run fits when the larger one fits. The numbers are estimates of the big terms (weights, gradients,
optimizer state, logits, activations, KV cache), not a measurement: allocator fragmentation, NCCL buffers and
kernels' workspaces are covered by a named allowance only.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

GIB = 2**30
ALLOWANCE_BYTES = GIB  # CUDA contexts + allocator fragmentation, per GPU and phase
VLLM_OVERHEAD_BYTES = GIB  # vLLM's CUDA context, CUDA graphs and non-torch memory inside its share
GPUS_PER_NODE_MAX = 8
BUDGET_FILL = 0.9  # a suggested token budget fills at most this fraction of the GPU in the training phase


class PlanInputError(ValueError):
    """Bad input to the planner: a one-line message that names the field (the CLI exits with status 2)."""


# --------------------------------------------------------------------------------------------------- model shape
@dataclass(frozen=True)
class ModelShape:
    """The sizes a memory plan needs, from a Hugging Face ``config.json`` (Llama/Qwen2/Qwen3-style decoder)."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool  # lm_head shares the input embedding
    qkv_bias: bool  # Qwen2: q/k/v projections have biases
    qk_norm: bool  # Qwen3: RMSNorm over each head's q and k
    max_positions: int  # max_position_embeddings: what vLLM takes when rollout.max_model_len is unset
    source: str = "built-in table"
    mlp_bias: bool = False
    o_bias: bool = False

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def layer_params(self) -> int:
        """One decoder layer: q/k/v/o projections (+ biases), gate/up/down MLP, two RMSNorms (+ Qwen3's q/k norms)."""
        h, q, kv, i = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        attn = h * q + 2 * h * kv + q * h
        if self.qkv_bias:
            attn += q + 2 * kv
        if self.o_bias:
            attn += h
        if self.qk_norm:
            attn += 2 * self.head_dim
        mlp = 3 * h * i + ((2 * i + h) if self.mlp_bias else 0)
        return attn + mlp + 2 * h

    def params(self) -> int:
        """Every parameter: embeddings, the layers, the final norm, and lm_head unless tied."""
        embed = self.vocab * self.hidden
        return embed + self.layers * self.layer_params() + self.hidden + (0 if self.tied else embed)

    def lora_params(self, rank: int, target_modules: Any = "all-linear") -> int:
        """A LoRA adapter of ``rank`` on the named linear layers (A: rank x in, B: out x rank); all-linear = the
        seven projections of every layer (peft leaves lm_head out)."""
        h, q, kv, i = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                  "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
        if isinstance(target_modules, str):
            names = list(shapes) if target_modules == "all-linear" else [target_modules]
        else:
            names = [str(n) for n in (target_modules or [])]
        per_layer = sum(rank * (shapes[n][0] + shapes[n][1]) for n in names if n in shapes)
        return self.layers * per_layer

    @classmethod
    def from_hf_config(cls, config: dict, name: str, source: str) -> "ModelShape":
        config = config.get("text_config", config) if "hidden_size" not in config else config
        try:
            hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
            model_type = str(config.get("model_type", ""))
            return cls(
                name=name, hidden=hidden, layers=int(config["num_hidden_layers"]), heads=heads,
                kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                intermediate=int(config["intermediate_size"]), vocab=int(config["vocab_size"]),
                tied=bool(config.get("tie_word_embeddings", False)),
                # transformers' Qwen2Attention always has q/k/v biases; Llama-style models say so in attention_bias
                qkv_bias=model_type.startswith("qwen2") or bool(config.get("attention_bias", False)),
                o_bias=bool(config.get("attention_bias", False)) and not model_type.startswith("qwen2"),
                mlp_bias=bool(config.get("mlp_bias", False)),
                qk_norm=model_type.startswith("qwen3"),
                max_positions=int(config.get("max_position_embeddings") or 0), source=source)
        except KeyError as exc:
            raise PlanInputError(f"actor_rollout_ref.model.path: {source} has no {exc.args[0]!r}; the planner "
                                 "sizes decoder-only models with Hugging Face's standard config keys") from None


def _qwen(name, hidden, layers, heads, kv_heads, intermediate, vocab, tied, max_positions, qwen3=False, head_dim=None):
    return ModelShape(name=name, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads,
                      head_dim=head_dim or hidden // heads, intermediate=intermediate, vocab=vocab, tied=tied,
                      qkv_bias=not qwen3, qk_norm=qwen3, max_positions=max_positions)


#: the shipped recipes' default models (their published config.json), so a plan needs no download
BUILTIN_SHAPES = {s.name: s for s in (
    _qwen("Qwen/Qwen2.5-7B-Instruct", 3584, 28, 28, 4, 18944, 152064, False, 32768),
    _qwen("Qwen/Qwen3-4B-Instruct-2507", 2560, 36, 32, 8, 9728, 151936, True, 262144, qwen3=True, head_dim=128),
    _qwen("Qwen/Qwen2.5-1.5B-Instruct", 1536, 28, 12, 2, 8960, 151936, True, 32768),
)}


def model_shape(path: str, hf_config_path: Optional[str] = None) -> ModelShape:
    """The shape of ``actor_rollout_ref.model.path``: its local ``config.json``, else the built-in table."""
    import json

    for candidate in (hf_config_path, path):
        if not candidate:
            continue
        folder = Path(str(candidate)).expanduser()
        config_file = folder / "config.json" if folder.is_dir() else folder
        if config_file.is_file() and config_file.name.endswith(".json"):
            try:
                config = json.loads(config_file.read_text())
            except (OSError, ValueError) as exc:
                raise PlanInputError(f"actor_rollout_ref.model.path: cannot read {config_file}: {exc}") from None
            return ModelShape.from_hf_config(config, str(path), f"{config_file}")
    if str(path) in BUILTIN_SHAPES:
        return BUILTIN_SHAPES[str(path)]
    raise PlanInputError(f"actor_rollout_ref.model.path={path}: not a local model folder with a config.json and not "
                         f"in the planner's table ({', '.join(BUILTIN_SHAPES)}); pass a local model folder "
                         "(actor_rollout_ref.model.path=/path/to/model); the planner never downloads")


# --------------------------------------------------------------------------------------------------- plan result
@dataclass
class Part:
    """One line of the plan. ``phase``: train (training phase only), rollout (rollout phase only), both (resident
    in both phases), vllm (inside vLLM's share, already counted by it), host (host RAM per node)."""

    name: str
    bytes: float
    phase: str
    note: str = ""

    @property
    def gib(self) -> float:
        return self.bytes / GIB


@dataclass
class Problem:
    part: str
    need_bytes: float
    have_bytes: float
    knob: str

    def line(self) -> str:
        return (f"{self.part} needs {self.need_bytes / GIB:.1f} GiB of {max(self.have_bytes, 0) / GIB:.1f} GiB "
                f"per GPU; {self.knob}")


@dataclass
class PlanResult:
    model: str
    shape: ModelShape
    params: int
    gpus_per_node: int
    nnodes: int
    gpu_mem_gb: float
    parts: list[Part]
    training_bytes: float
    rollout_bytes: float
    host_bytes_per_node: float
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    header: str = ""

    @property
    def fits(self) -> bool:
        return not self.problems

    @property
    def training_gib(self) -> float:
        return self.training_bytes / GIB

    @property
    def rollout_gib(self) -> float:
        return self.rollout_bytes / GIB

    def part(self, name: str) -> Part:
        """The part whose name starts with ``name``."""
        for p in self.parts:
            if p.name.startswith(name):
                return p
        raise KeyError(name)

    @property
    def verdict(self) -> str:
        if self.problems:
            return f"does not fit: {self.problems[0].line()}"
        peak = max(self.training_bytes, self.rollout_bytes)
        phase = "training" if self.training_bytes >= self.rollout_bytes else "rollout"
        return (f"fits: the {phase} phase peaks at {peak / GIB:.1f} GiB of {self.gpu_mem_gb:g} GiB per GPU "
                f"({self.gpu_mem_gb - peak / GIB:.1f} GiB spare)")

    def table(self) -> str:
        rows = [("part", "GiB/GPU", "phase", "note")]
        for p in self.parts:
            if p.phase != "host":
                rows.append(("  " + p.name if p.phase == "vllm" else p.name, f"{p.gib:.2f}", p.phase, p.note))
        rows.append(("training phase total", f"{self.training_gib:.2f}", "train",
                     "actor update + log-prob passes (vLLM asleep)"))
        rows.append(("rollout phase total", f"{self.rollout_gib:.2f}", "rollout",
                     "vLLM awake + the training engine's resident state"))
        rows.append(("", "", "", ""))
        rows.append(("host RAM per node", "GiB/node", "", ""))
        host = [p for p in self.parts if p.phase == "host"]
        for p in host:
            rows.append((p.name, f"{p.gib:.2f}", "host", p.note))
        rows.append(("host RAM total", f"{self.host_bytes_per_node / GIB:.2f}", "host",
                     "on top of Ray, the dataloader and the environments"))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = []
        for r in rows:
            lines.append(f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}".rstrip())
        return "\n".join(lines)

    def report(self, title: str = "") -> str:
        """The header, the table, notes, further problems and the verdict (the last line)."""
        out = [f"{title}: {self.header}" if title else self.header, "", self.table(), ""]
        out += [f"note: {n}" for n in self.notes]
        out += [f"also: {p.line()}" for p in self.problems[1:]]
        out.append(self.verdict)
        return "\n".join(out)


# --------------------------------------------------------------------------------------------------- config reading
_DTYPE_BYTES = {"fp32": 4, "float32": 4, "float": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "half": 2}


def _sel(cfg: Any, key: str, default: Any = None) -> Any:
    from omegaconf import OmegaConf

    value = OmegaConf.select(cfg, key, default=default)
    return default if value is None else value


def _dtype_bytes(value: Any, default: int, key: str) -> int:
    if value is None:
        return default
    try:
        return _DTYPE_BYTES[str(value).lower()]
    except KeyError:
        raise PlanInputError(f"{key}={value}: unknown dtype (fp32, bf16 or fp16)") from None


def _int(cfg: Any, key: str, default: Optional[int] = None) -> Optional[int]:
    value = _sel(cfg, key, default)
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise PlanInputError(f"{key}={value}: expected an integer") from None


@dataclass
class _Tokens:
    """Tokens per GPU of the largest micro-batch of each pass."""

    update: float
    actor_log_prob: float
    ref_log_prob: float  # 0 without a separate reference model


def _fmt_gpus(total: int) -> str:
    if total <= GPUS_PER_NODE_MAX:
        return f"trainer.n_gpus_per_node={total}"
    return f"trainer.nnodes={math.ceil(total / GPUS_PER_NODE_MAX)} trainer.n_gpus_per_node={GPUS_PER_NODE_MAX}"


# --------------------------------------------------------------------------------------------------- the plan
def plan(cfg: Any, gpus: Optional[int], gpu_mem_gb: float, *, nnodes: Optional[int] = None,
         targeted_frac: float = 1.0, shape: Optional[ModelShape] = None, _search: bool = True) -> PlanResult:
    """The per-GPU memory plan of a composed main_ppo config on ``gpus`` GPUs per node of ``gpu_mem_gb`` GiB each
    (``gpus``/``nnodes`` None: the config's ``trainer.n_gpus_per_node``/``trainer.nnodes``)."""
    from verl_hindsight.config import kl_to_reference, load_hindsight_config, lora_enabled
    from verl_hindsight.trainer.teacher_weights import TeacherWeights

    gpus = int(gpus if gpus is not None else _int(cfg, "trainer.n_gpus_per_node", 1))
    nnodes = int(nnodes if nnodes is not None else _int(cfg, "trainer.nnodes", 1))
    if gpus < 1:
        raise PlanInputError(f"trainer.n_gpus_per_node={gpus}: must be >= 1")
    if nnodes < 1:
        raise PlanInputError(f"trainer.nnodes={nnodes}: must be >= 1")
    if not gpu_mem_gb > 0:
        raise PlanInputError(f"--gpu-mem={gpu_mem_gb}: must be > 0 (GiB per GPU)")
    if not 0.0 <= targeted_frac <= 1.0:
        raise PlanInputError(f"--targeted-frac={targeted_frac}: must be in [0, 1]")
    strategy = str(_sel(cfg, "actor_rollout_ref.actor.strategy", "fsdp"))
    if strategy not in ("fsdp", "fsdp2"):
        raise PlanInputError(f"actor_rollout_ref.actor.strategy={strategy}: the planner models verl's FSDP engines "
                             "(fsdp, fsdp2) only")
    model_path = str(_sel(cfg, "actor_rollout_ref.model.path", ""))
    shape = shape or model_shape(model_path, _sel(cfg, "actor_rollout_ref.model.hf_config_path"))
    hs = load_hindsight_config(cfg)
    gpu_bytes = gpu_mem_gb * GIB
    notes: list[str] = []

    # ---- parallel layout
    world = gpus * nnodes
    fsdp_size = _int(cfg, "actor_rollout_ref.actor.fsdp_config.fsdp_size", -1)
    # verl's create_device_mesh: FSDP shards over the whole world (fsdp_size -1) or fsdp_size ranks; Ulysses sequence
    # parallelism splits each sequence's tokens but does not change the FSDP sharding
    shards = world if fsdp_size is None or fsdp_size <= 0 or fsdp_size >= world else fsdp_size
    sp = max(_int(cfg, "actor_rollout_ref.actor.ulysses_sequence_parallel_size", 1) or 1,
             _int(cfg, "actor_rollout_ref.actor.fsdp_config.ulysses_sequence_parallel_size", 1) or 1)
    per_node = gpus / shards  # share of one sharded copy held by one node's ranks (host RAM)

    # ---- dtypes and offload (verl's engine/fsdp.yaml: model_dtype fp32 for training; forward-only engines bf16)
    actor_bytes = _dtype_bytes(_sel(cfg, "actor_rollout_ref.actor.fsdp_config.model_dtype"), 4,
                               "actor_rollout_ref.actor.fsdp_config.model_dtype")
    ref_bytes = _dtype_bytes(_sel(cfg, "actor_rollout_ref.ref.fsdp_config.model_dtype"), 2,
                             "actor_rollout_ref.ref.fsdp_config.model_dtype")
    param_offload = bool(_sel(cfg, "actor_rollout_ref.actor.fsdp_config.param_offload", False))
    optimizer_offload = bool(_sel(cfg, "actor_rollout_ref.actor.fsdp_config.optimizer_offload", False))
    # FSDP2's CPUOffloadPolicy (offload_policy=true) keeps params, grads and optimizer state in host RAM throughout;
    # verl ignores it on FSDP1 and then turns param/optimizer offload off
    offload_policy = bool(_sel(cfg, "actor_rollout_ref.actor.fsdp_config.offload_policy", False)) and \
        strategy == "fsdp2"
    if offload_policy:
        param_offload = optimizer_offload = False

    lora = lora_enabled(cfg)
    lora_rank = _int(cfg, "actor_rollout_ref.model.lora.rank", 0) or _int(cfg, "actor_rollout_ref.model.lora_rank", 0)
    n_params = shape.params()
    adapter = shape.lora_params(lora_rank, _sel(cfg, "actor_rollout_ref.model.target_modules", "all-linear")) \
        if lora and lora_rank else 0
    trainable = adapter if lora else n_params
    trainable_layer = (adapter // shape.layers) if lora else shape.layer_params()

    # ---- tokens per GPU of the largest micro-batch of each pass
    prompt_len = _int(cfg, "data.max_prompt_length", 512)
    response_len = _int(cfg, "data.max_response_length", 512)
    row = prompt_len + response_len
    dynamic = bool(_sel(cfg, "actor_rollout_ref.actor.use_dynamic_bsz", False))

    def micro_rows(key_per_gpu: str, key_total: str) -> int:
        per_gpu = _int(cfg, key_per_gpu)
        if per_gpu is None:
            total = _int(cfg, key_total)
            if total is None:
                raise PlanInputError(f"{key_per_gpu}: unset (and {key_total} too); set it or "
                                     "actor_rollout_ref.actor.use_dynamic_bsz=true")
            per_gpu = max(1, total // max(1, world // sp))  # verl's normalization of the global micro-batch
        return per_gpu

    def tokens(dyn: bool, rows_keys: tuple[str, str], budget_key: str) -> float:
        if dyn:  # verl's dynamic batching packs up to this many tokens per GPU (x sp per Ulysses group)
            return float(_int(cfg, budget_key, 16384))
        return micro_rows(*rows_keys) * row / sp  # a micro-batch of full-length rows, split over the SP group

    ref_separate = (bool(kl_to_reference(cfg)) or (hs.enable and hs.teacher.uses_reference_model)) and not lora
    tok = _Tokens(
        update=tokens(dynamic, ("actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu",
                                "actor_rollout_ref.actor.ppo_micro_batch_size"),
                      "actor_rollout_ref.actor.ppo_max_token_len_per_gpu"),
        actor_log_prob=tokens(bool(_sel(cfg, "actor_rollout_ref.rollout.log_prob_use_dynamic_bsz", dynamic)),
                              ("actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu",
                               "actor_rollout_ref.rollout.log_prob_micro_batch_size"),
                              "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu"),
        ref_log_prob=tokens(bool(_sel(cfg, "actor_rollout_ref.ref.log_prob_use_dynamic_bsz", dynamic)),
                            ("actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu",
                             "actor_rollout_ref.ref.log_prob_micro_batch_size"),
                            "actor_rollout_ref.ref.log_prob_max_token_len_per_gpu") if ref_separate else 0.0,
    )
    checkpointing = bool(_sel(cfg, "actor_rollout_ref.model.enable_gradient_checkpointing", False))
    topk = hs.enable and hs.distill.enabled and hs.distill.divergence == "topk_tail"
    k = int(hs.distill.topk)

    h, layers, vocab, inter = shape.hidden, shape.layers, shape.vocab, shape.intermediate

    def activation_bytes(t: float) -> float:
        if checkpointing:
            # each layer's checkpointed input (bf16), plus the one layer being recomputed in the backward
            return t * h * layers * 2 + t * (4 * h + 2 * inter) * 2
        # estimate: per layer the bf16 tensors autograd keeps (norm inputs/outputs, q/k/v, attention output,
        # residuals, gate/up and their product; fp32 RMSNorm upcasts), no attention matrix (flash/sdpa)
        return layers * t * (10 * h + 2 * shape.kv_dim + 4 * inter) * 2

    def logits_bytes(t: float) -> float:
        return t * vocab * (2 + 4)  # bf16 logits + the fp32 log-softmax over them

    # an entropy term (or logging it) adds an fp32 softmax over the update's logits, unless verl chunks it
    entropy = (bool(_sel(cfg, "actor_rollout_ref.actor.calculate_entropy", False))
               or float(_sel(cfg, "actor_rollout_ref.actor.entropy_coeff", 0.0)) != 0.0) \
        and not bool(_sel(cfg, "actor_rollout_ref.actor.entropy_from_logits_with_chunking", False))

    def update_logits_bytes(t: float) -> float:
        return logits_bytes(t) + (t * vocab * 4 if entropy else 0.0)

    def topk_bytes(t: float) -> float:
        if not topk:
            return 0.0
        targeted = targeted_frac * t * response_len / row
        return targeted * vocab * 4 + t * k * (8 + 4)  # fp32 vocab rows kept for backward + teacher ids/log-probs

    # ---- training phase
    shard = 1.0 / shards
    params_gpu = 0.0 if offload_policy else n_params * actor_bytes * shard
    grads_gpu = 0.0 if offload_policy else trainable * actor_bytes * shard
    adam_gpu = 0.0 if offload_policy else 2 * trainable * actor_bytes * shard
    # FSDP all-gathers each wrapped module in bf16 (mixed precision) for its forward/backward: the running layer and
    # the prefetched one, the vocabulary matrix (embedding / lm_head), and one layer's unsharded fp32 gradients
    # before the reduce-scatter
    unshard = (2 * shape.layer_params() + vocab * h) * 2 + trainable_layer * actor_bytes
    acts = activation_bytes(tok.update)
    logit_candidates = {"update": update_logits_bytes(tok.update), "actor log-prob": logits_bytes(tok.actor_log_prob),
                        "reference/teacher log-prob": logits_bytes(tok.ref_log_prob)}
    logit_pass = max(logit_candidates, key=logit_candidates.get)
    logits = logit_candidates[logit_pass]
    topk_b = topk_bytes(tok.update)
    pass_tokens = {"update": tok.update, "actor log-prob": tok.actor_log_prob,
                   "reference/teacher log-prob": tok.ref_log_prob}[logit_pass]

    dtype_name = {4: "fp32", 2: "bf16"}[actor_bytes]
    offload_note = " (offload_policy: in host RAM)" if offload_policy else ""
    parts = [
        Part(f"actor weights ({dtype_name})", params_gpu, "both" if not (param_offload or offload_policy) else "train",
             f"{n_params / 1e9:.2f}B params / {shards} FSDP shards{offload_note}"
             + ("; param_offload: host RAM while vLLM is awake" if param_offload else "")),
        Part(f"actor gradients ({dtype_name})", grads_gpu, "train",
             ("LoRA adapter only; " if lora else "") + f"sharded like the weights{offload_note}; freed after "
             "each update"),
        Part(f"Adam state (2 x {dtype_name})", adam_gpu,
             "both" if not (optimizer_offload or offload_policy) else "train",
             ("LoRA adapter only; " if lora else "") + f"exp_avg + exp_avg_sq, sharded{offload_note}"
             + ("; optimizer_offload: host RAM while vLLM is awake" if optimizer_offload else "")),
        Part("FSDP all-gather buffers", unshard, "train",
             "bf16 copies of 2 layers + the vocabulary matrix, one layer's unsharded fp32 grads"),
        Part("activations", acts, "train",
             f"{tok.update:.0f} tokens/GPU in the update micro-batch; "
             + ("gradient checkpointing: layer inputs + one layer's working set" if checkpointing else
                "no gradient checkpointing: rough per-layer sum (estimate)")),
        Part("logits", logits, "train",
             f"{pass_tokens:.0f} tokens x {vocab} vocab x (2 bf16 + 4 fp32 log-softmax"
             + (" + 4 fp32 entropy" if entropy and logit_pass == "update" else "") + f"), largest: {logit_pass} pass"),
    ]
    if topk:
        parts.append(Part("top-k buffers (topk_tail)", topk_b, "train",
                          f"fp32 vocab row per targeted token ({targeted_frac:g} of response tokens) + teacher "
                          f"top-{k} ids/log-probs"))
    parts.append(Part("CUDA context + fragmentation allowance", ALLOWANCE_BYTES, "both",
                      "both processes' CUDA contexts, allocator slack (fixed allowance)"))
    training = params_gpu + grads_gpu + adam_gpu + unshard + acts + logits + topk_b + ALLOWANCE_BYTES

    # ---- rollout phase (vLLM awake)
    rollout_name = str(_sel(cfg, "actor_rollout_ref.rollout.name", "vllm"))
    tp = _int(cfg, "actor_rollout_ref.rollout.tensor_model_parallel_size", 1) or 1
    util = float(_sel(cfg, "actor_rollout_ref.rollout.gpu_memory_utilization", 0.5))
    max_model_len = _int(cfg, "actor_rollout_ref.rollout.max_model_len")
    rollout_bytes = _dtype_bytes(_sel(cfg, "actor_rollout_ref.rollout.dtype"), 2, "actor_rollout_ref.rollout.dtype")
    if world % tp:
        raise PlanInputError(f"actor_rollout_ref.rollout.tensor_model_parallel_size={tp}: must divide the {world} GPUs")
    if shape.max_positions and max_model_len and max_model_len > shape.max_positions:
        raise PlanInputError(f"actor_rollout_ref.rollout.max_model_len={max_model_len}: above the model's "
                             f"max_position_embeddings {shape.max_positions} (verl refuses it)")
    seq_len = max_model_len or shape.max_positions
    kv_heads_gpu = math.ceil(shape.kv_heads / tp)  # vLLM replicates KV heads when TP > kv heads
    kv_per_token = 2 * layers * kv_heads_gpu * shape.head_dim * rollout_bytes
    kv_one = kv_per_token * seq_len
    share = util * gpu_bytes
    vllm_weights = n_params * rollout_bytes / tp
    batched = _int(cfg, "actor_rollout_ref.rollout.max_num_batched_tokens", 8192)
    seqs = _int(cfg, "actor_rollout_ref.rollout.max_num_seqs", 256)
    # vLLM's profile run: one layer's working set for a max_num_batched_tokens prefill, fp32 sampler logits for
    # max_num_seqs, plus its CUDA context / graphs (estimate)
    vllm_work = batched * (4 * h + 2 * inter / tp) * 2 + seqs * vocab * 4 + VLLM_OVERHEAD_BYTES
    kv_room = share - vllm_weights - vllm_work
    resident_params = 0.0 if (param_offload or offload_policy) else params_gpu
    resident_adam = 0.0 if (optimizer_offload or offload_policy) else adam_gpu
    uses_vllm_share = rollout_name in ("vllm", "sglang")
    if uses_vllm_share:
        len_note = (f"rollout.max_model_len={max_model_len}" if max_model_len else
                    f"rollout.max_model_len unset: vLLM takes max_position_embeddings={seq_len}")
        parts += [
            Part("vLLM share", share, "rollout", f"rollout.gpu_memory_utilization={util:g} x {gpu_mem_gb:g} GiB"),
            Part("vLLM weights (bf16)", vllm_weights, "vllm", f"/ tensor_model_parallel_size {tp}"),
            Part("vLLM working memory", vllm_work, "vllm",
                 f"prefill of {batched} tokens, sampler for {seqs} seqs, CUDA graphs/context (estimate)"),
            Part(f"KV cache, one {seq_len}-token sequence", kv_one, "vllm",
                 f"{kv_per_token / 1024:.0f} KiB/token; {len_note}"),
            Part("KV cache left for batching", max(0.0, kv_room - kv_one), "vllm",
                 "what the share holds beyond one full-length sequence"),
        ]
        rollout = share + resident_params + resident_adam + ALLOWANCE_BYTES
        if not bool(_sel(cfg, "actor_rollout_ref.rollout.free_cache_engine", True)):
            parts.append(Part("vLLM share kept during training", share, "train",
                              "rollout.free_cache_engine=false: vLLM does not sleep"))
            training += share
    else:
        notes.append(f"rollout.name={rollout_name}: the rollout engine's memory is not modeled (vLLM/SGLang only)")
        rollout = resident_params + resident_adam + ALLOWANCE_BYTES
    if not max_model_len and uses_vllm_share:
        notes.append(f"actor_rollout_ref.rollout.max_model_len is unset: vLLM sizes for max_position_embeddings="
                     f"{seq_len} tokens ({kv_one / GIB:.1f} GiB of KV cache for one sequence)")

    # ---- host RAM per node
    teacher = TeacherWeights(hs.teacher, hs.enable, kl_to_reference(cfg), lora=lora)
    host: list[Part] = []
    if ref_separate:
        host.append(Part(f"reference model ({ {4: 'fp32', 2: 'bf16'}[ref_bytes]}, CPU-offloaded)",
                         n_params * ref_bytes * per_node, "host",
                         "FSDP2 CPUOffloadPolicy(pin_memory); the GPU holds only the layer being run"))
    elif lora and (kl_to_reference(cfg) or (hs.enable and hs.teacher.uses_reference_model)):
        notes.append("LoRA: the reference is the actor with the adapter off (no extra weights)")
    if teacher.own_weights:
        copy = adapter * actor_bytes if teacher.in_adapter else n_params * ref_bytes
        host.append(Part(f"{hs.teacher.kind} teacher's own weights", copy * per_node, "host",
                         "second LoRA adapter" if teacher.in_adapter else "one more copy next to the reference"))
    if offload_policy:
        host.append(Part("actor weights + grads + Adam (offload_policy)",
                         (n_params + 3 * trainable) * actor_bytes * per_node, "host", "optimizer steps on the CPU"))
    if param_offload:
        host.append(Part("actor weights (param_offload)", n_params * actor_bytes * per_node, "host",
                         "while vLLM is awake"))
    if optimizer_offload:
        host.append(Part("Adam state (optimizer_offload)", 2 * trainable * actor_bytes * per_node, "host",
                         "while vLLM is awake"))
    if lora and uses_vllm_share and not bool(_sel(cfg, "actor_rollout_ref.model.lora.merge", False)):
        host.append(Part("vLLM weights asleep (LoRA: sleep level 1)", vllm_weights * gpus, "host",
                         "kept in host RAM while the actor trains"))
    parts += host
    host_total = sum(p.bytes for p in host)

    if hs.enable and not (hs.teacher.uses_reference_model or lora):
        notes.append(f"{hs.teacher.kind} teacher: scored by the actor itself (no extra weights)")
    if lora:
        notes.append(f"LoRA rank {lora_rank}: {adapter / 1e6:.1f}M trainable parameters; the base stays in "
                     f"{dtype_name}")

    result = PlanResult(model=model_path, shape=shape, params=n_params, gpus_per_node=gpus, nnodes=nnodes,
                        gpu_mem_gb=gpu_mem_gb, parts=parts, training_bytes=training, rollout_bytes=rollout,
                        host_bytes_per_node=host_total, notes=notes)
    result.header = (f"{model_path}: {n_params / 1e9:.2f}B parameters ({shape.source}); {gpus} GPU(s) x {nnodes} "
                     f"node(s), {gpu_mem_gb:g} GiB per GPU; FSDP ({strategy}) shards over {shards}, Ulysses SP {sp}, "
                     f"rollout {rollout_name} TP {tp}")

    # ---- what does not fit, in the order the knobs should be turned
    problems: list[tuple[int, Problem]] = []
    if uses_vllm_share and kv_one > kv_room and not max_model_len:
        problems.append((0, Problem(
            f"vLLM KV cache for one {seq_len}-token sequence", kv_one, kv_room,
            f"set actor_rollout_ref.rollout.max_model_len={row} (prompt + response; unset, vLLM takes "
            f"max_position_embeddings={seq_len})")))

    if training > gpu_bytes:
        state = params_gpu + grads_gpu + adam_gpu
        fixed = training - acts - logits - topk_b
        per_token = activation_bytes(1.0) + update_logits_bytes(1.0) + topk_bytes(1.0)
        min_budget = math.ceil(row / sp)  # verl's dynamic batching needs one full row per micro-batch
        budget = math.floor((gpu_bytes - fixed) / per_token) if gpu_bytes > fixed else 0
        if budget >= min_budget:  # suggest a budget that leaves 10% of the GPU for what the estimate misses
            safe = math.floor((BUDGET_FILL * gpu_bytes - fixed) / per_token) // 1024 * 1024
            budget = max(safe, min_budget)
        big = f"logits of the {logit_pass} pass: {logits / GIB:.1f} GiB" if logits >= state else \
            f"{dtype_name} weights, gradients and Adam state: {state / GIB:.1f} GiB"
        part = f"training phase ({big})"
        if budget >= min_budget and not dynamic:
            problems.append((1, Problem(part, training, gpu_bytes,
                             f"set actor_rollout_ref.actor.use_dynamic_bsz=true actor_rollout_ref.actor."
                             f"ppo_max_token_len_per_gpu={budget} (the log-prob passes follow it)")))
        elif budget >= min_budget:
            problems.append((1, Problem(part, training, gpu_bytes,
                             f"lower actor_rollout_ref.actor.ppo_max_token_len_per_gpu to {budget} (and "
                             "rollout/ref log_prob_max_token_len_per_gpu if set)")))
        elif state >= per_token * min_budget:
            fitting = training_fits = None
            if _search:  # the smallest GPU count on which the whole run (else its training phase) fits as configured
                for total in (2, 4, 8, 16, 32, 64, 128, 256):
                    if total <= world:
                        continue
                    try:
                        other = plan(cfg, min(total, GPUS_PER_NODE_MAX), gpu_mem_gb, shape=shape,
                                     nnodes=math.ceil(total / GPUS_PER_NODE_MAX), targeted_frac=targeted_frac,
                                     _search=False)
                    except PlanInputError:
                        continue
                    if training_fits is None and other.training_bytes <= gpu_bytes:
                        training_fits = total
                    if other.fits:
                        fitting = total
                        break
            offload = ("or actor_rollout_ref.actor.fsdp_config.offload_policy=true (FSDP2 keeps them in host RAM; the "
                       "optimizer steps on the CPU)")
            if fitting:
                knob = f"more GPUs: the run fits on {fitting} ({_fmt_gpus(fitting)}), {offload}"
            elif training_fits:
                knob = f"more GPUs: the training phase fits on {training_fits} ({_fmt_gpus(training_fits)}), {offload}"
            else:
                knob = _more_gpus_knob(state, world, fixed - state, per_token * min_budget, gpu_bytes, offload)
            problems.append((2, Problem(part, training, gpu_bytes, knob)))
        else:
            sp_need = next((s for s in (2, 4, 8, 16, 32) if fixed + per_token * math.ceil(row / s) <= gpu_bytes),
                           None)
            knob = (f"split each {row}-token row over more GPUs: actor_rollout_ref.actor.ulysses_sequence_parallel_"
                    f"size={sp_need} with use_dynamic_bsz=true" if sp_need else
                    "rows are too long for this GPU: shorten data.max_prompt_length/max_response_length")
            if sp_need and sp_need > world:
                knob += f" ({_fmt_gpus(sp_need)})"
            problems.append((2, Problem(part, training, gpu_bytes, knob)))

    if uses_vllm_share and vllm_weights + vllm_work > share:
        tp_need = next((t for t in (2, 4, 8) if t <= world and world % t == 0 and
                        n_params * rollout_bytes / t + vllm_work + kv_per_token * row * tp / t <= share), None)
        util_need = (vllm_weights + vllm_work + kv_per_token * row) / gpu_bytes
        knob = f"raise actor_rollout_ref.rollout.gpu_memory_utilization to {math.ceil(util_need * 100) / 100:.2f}"
        if tp_need:
            knob = f"set actor_rollout_ref.rollout.tensor_model_parallel_size={tp_need}, or " + knob
        problems.append((3, Problem(f"vLLM weights + working memory (TP {tp})", vllm_weights + vllm_work, share, knob)))
    elif uses_vllm_share and kv_one > kv_room and max_model_len:
        fit_len = int(max(kv_room, 0) // kv_per_token)
        problems.append((4, Problem(
            f"vLLM KV cache for one {seq_len}-token sequence", kv_one, kv_room,
            f"lower actor_rollout_ref.rollout.max_model_len to <= {fit_len}, or raise rollout.gpu_memory_utilization "
            f"or tensor_model_parallel_size")))

    if rollout > gpu_bytes:
        resident = resident_params + resident_adam
        if resident and not (param_offload and optimizer_offload):
            knob = ("set actor_rollout_ref.actor.fsdp_config.param_offload=true actor_rollout_ref.actor.fsdp_config."
                    "optimizer_offload=true (verl moves the weights and Adam state to host RAM while vLLM is awake)")
        else:
            room = (gpu_bytes - resident - ALLOWANCE_BYTES) / gpu_bytes
            knob = f"lower actor_rollout_ref.rollout.gpu_memory_utilization to {math.floor(room * 100) / 100:.2f}"
        problems.append((5, Problem(
            f"rollout phase (vLLM share {share / GIB:.1f} GiB + resident training state {resident / GIB:.1f} GiB)",
            rollout, gpu_bytes, knob)))

    result.problems = [p for _, p in sorted(problems, key=lambda item: item[0])]
    peak = max(training, rollout)
    if not result.problems and peak > BUDGET_FILL * gpu_bytes:
        notes.append(f"tight: less than {100 * (1 - BUDGET_FILL):.0f}% of the GPU is spare, within this estimate's "
                     "error; check perf/max_memory_reserved_gb in the first steps")
    return result


def _more_gpus_knob(state: float, world: int, other_fixed: float, row_tokens: float, gpu_bytes: float,
                    offload: str) -> str:
    """More GPUs shard the weights, gradients and Adam state (here: enough for the training phase alone)."""
    for total in (2, 4, 8, 16, 32, 64, 128, 256):
        if total > world and state * world / total + other_fixed + row_tokens <= gpu_bytes:
            return (f"more GPUs: {total} ({_fmt_gpus(total)}) shard them to {state * world / total / GIB:.1f} GiB "
                    f"per GPU, {offload}")
    return f"more GPUs than 256, {offload}"


# --------------------------------------------------------------------------------------------------- composition
def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def compose_recipe(recipe: str, overrides: list[str], gpus: Optional[int] = None, nnodes: Optional[int] = None):
    """The config ``python -m verl.trainer.main_ppo --config-path <recipes dir> --config-name RECIPE overrides``
    builds (``gpus``/``nnodes`` set trainer.n_gpus_per_node/nnodes unless an override does); :func:`validate` checks
    it as main_ppo does. ``recipe``: ``alfworld/serl``, ``serl``, or a path to a yaml file."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from verl_hindsight.launch import recipes_dir

    path = Path(recipe)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        config_dir, name = path.resolve().parent, path.stem
    else:
        group, _, name = recipe.removesuffix(".yaml").rpartition("/")
        config_dir = recipes_dir() / group
        if not (config_dir / f"{name}.yaml").is_file():
            raise PlanInputError(f"RECIPE {recipe}: no {config_dir / (name + '.yaml')} (shipped recipes: "
                                 "grpo, serl, hint_sd, hero, <env>/<method>[_lora]; `verl-hindsight recipes` prints "
                                 "the folder)")
    overrides = list(overrides)
    keys = {_override_key(o) for o in overrides}
    if gpus is not None and "trainer.n_gpus_per_node" not in keys:
        overrides.append(f"trainer.n_gpus_per_node={gpus}")
    if nnodes is not None and "trainer.nnodes" not in keys:
        overrides.append(f"trainer.nnodes={nnodes}")
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base=None):
            cfg = compose(config_name=name, overrides=overrides)
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        raise PlanInputError(f"cannot compose {recipe} with {overrides}: {_first_line(exc)}") from None
    validate(cfg)
    return cfg


def validate(cfg) -> list[str]:
    """verl's own ``validate_config`` and the plugin's settings check, as main_ppo runs them (PlanInputError);
    returns notes on what could not be checked here."""
    import contextlib
    import importlib.util
    import io

    from omegaconf import open_dict
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    from verl_hindsight.config import load_hindsight_config, lora_enabled

    notes = []
    checked = cfg
    if lora_enabled(cfg) and str(_sel(cfg, "actor_rollout_ref.rollout.name", "")) == "vllm" and \
            importlib.util.find_spec("vllm") is None:
        # verl's last check compares the LoRA rank with vLLM's limit and imports vllm for it: skip that one check
        checked = cfg.copy()
        with open_dict(checked):
            checked.actor_rollout_ref.model.lora.merge = True
        notes.append("vLLM is not installed here: verl's LoRA-rank-vs-vLLM check was skipped")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # need_critic warns that a non-GAE estimator has no critic
        critic = need_critic(cfg)
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # validate_config prints a success line
                validate_config(checked, use_reference_policy=need_reference_policy(cfg), use_critic=critic)
            load_hindsight_config(cfg)
        except (AssertionError, ValueError, TypeError, KeyError) as exc:
            raise PlanInputError(f"invalid config (verl/plugin validation): {_first_line(exc)}") from None
    if critic:
        notes.append("a critic (GAE) is not in the plan")
    return notes


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def run_cli(args) -> int:
    """``verl-hindsight plan``: print the plan; 0 fits, 1 does not fit, 2 bad input."""
    import sys

    try:
        if args.gpus is not None and args.gpus < 1:
            raise PlanInputError(f"--gpus={args.gpus}: must be >= 1")
        if args.nnodes is not None and args.nnodes < 1:
            raise PlanInputError(f"--nnodes={args.nnodes}: must be >= 1")
        if not args.gpu_mem > 0:
            raise PlanInputError(f"--gpu-mem={args.gpu_mem}: must be > 0 (GiB per GPU)")
        if not 0.0 <= args.targeted_frac <= 1.0:
            raise PlanInputError(f"--targeted-frac={args.targeted_frac}: must be in [0, 1]")
        cfg = compose_recipe(args.recipe, args.overrides or [], gpus=args.gpus, nnodes=args.nnodes)
        notes = validate(cfg)
        result = plan(cfg, None, args.gpu_mem, targeted_frac=args.targeted_frac)
        result.notes += notes
    except PlanInputError as exc:
        print(f"verl-hindsight plan: {exc}", file=sys.stderr)
        return 2
    print(result.report(title=f"verl-hindsight plan {args.recipe}"))
    return 0 if result.fits else 1
