"""``verl-hindsight plan``: the per-GPU memory planner (verl_hindsight/plan.py). Every number here is hand arithmetic
on a small shape, a published parameter count, or a model built offline; nothing needs a GPU or a download."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from verl_hindsight.cli import main
from verl_hindsight.plan import BUILTIN_SHAPES, GIB, ModelShape, PlanInputError, compose_recipe, model_shape, plan, \
    validate

# a Llama-style shape with round numbers: no biases, no q/k norms, untied lm_head
H, LAYERS, HEADS, KV, HEAD_DIM, INTER, VOCAB = 1024, 10, 8, 2, 128, 4096, 32000
LAYER = H * H + 2 * H * (KV * HEAD_DIM) + H * H + 3 * H * INTER + 2 * H  # q, k+v, o, gate/up/down, two norms
PARAMS = 2 * VOCAB * H + LAYERS * LAYER + H  # embedding + lm_head, layers, final norm


@pytest.fixture(scope="module")
def round_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("round_model")
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": H, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV, "head_dim": HEAD_DIM, "intermediate_size": INTER, "vocab_size": VOCAB,
        "tie_word_embeddings": False, "max_position_embeddings": 8192}))
    return folder


# the arithmetic tests count fixed micro-batches of full rows; the shipped GPU recipes batch by tokens
FIXED = ["actor_rollout_ref.actor.use_dynamic_bsz=false"]
# bfcl/serl as first shipped (one GPU, vLLM sized for the model's context, fixed micro-batches): what the planner
# was written to catch
UNSIZED = ["actor_rollout_ref.rollout.max_model_len=null", *FIXED]


def planned(recipe, overrides, gpus, gpu_mem, **kwargs):
    cfg = compose_recipe(recipe, overrides, gpus=gpus)
    validate(cfg)
    return plan(cfg, None, gpu_mem, **kwargs)


def test_parameter_counts_match_the_published_totals():
    published = {"Qwen/Qwen2.5-7B-Instruct": 7.62e9, "Qwen/Qwen3-4B-Instruct-2507": 4.02e9,
                 "Qwen/Qwen2.5-1.5B-Instruct": 1.54e9}
    for name, total in published.items():
        assert BUILTIN_SHAPES[name].params() == pytest.approx(total, rel=0.01), name
    assert model_shape("Qwen/Qwen3-4B-Instruct-2507").max_positions == 262144


@pytest.mark.parametrize("tied", [True, False])
def test_parameter_count_is_exact_on_a_tiny_model_built_offline(tmp_path, tied):
    import torch
    from transformers import AutoModelForCausalLM

    from verl_hindsight.tiny_model import make_tiny_model

    folder = make_tiny_model(tmp_path / "tiny", tie_word_embeddings=tied)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    shape = model_shape(str(folder))
    assert shape.tied is tied and shape.qkv_bias  # Qwen2: q/k/v biases
    assert shape.params() == sum(p.numel() for p in model.parameters())
    # a LoRA adapter on every linear layer: peft's own count
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    assert shape.lora_params(4) == sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)


def test_every_part_is_the_arithmetic_of_a_small_known_shape(round_model):
    # generic serl (lagged teacher in the reference slot, no KL), 2 GPUs of 40 GiB, rows of 1024 + 1024 tokens
    result = planned("serl", [f"actor_rollout_ref.model.path={round_model}", "data.max_prompt_length=1024",
                              "data.max_response_length=1024", "actor_rollout_ref.rollout.max_model_len=2048", *FIXED],
                     gpus=2, gpu_mem=40)
    assert result.params == PARAMS
    gib = 40 * GIB
    weights, grads, adam = PARAMS * 4 / 2, PARAMS * 4 / 2, 2 * PARAMS * 4 / 2  # fp32, FSDP over 2 ranks
    unshard = (2 * LAYER + VOCAB * H) * 2 + LAYER * 4  # 2 bf16 layers + vocab matrix, one layer's fp32 grads
    update_tokens, log_prob_tokens = 4 * 2048, 8 * 2048  # micro-batches 4 (update) / 8 (log-prob) full rows
    activations = update_tokens * H * LAYERS * 2 + update_tokens * (4 * H + 2 * INTER) * 2  # checkpointing on
    logits = log_prob_tokens * VOCAB * 6
    expected = {"actor weights": weights, "actor gradients": grads, "Adam state": adam,
                "FSDP all-gather buffers": unshard, "activations": activations, "logits": logits,
                "CUDA context": GIB}
    for name, value in expected.items():
        assert result.part(name).bytes == pytest.approx(value), name
    assert result.training_bytes == pytest.approx(sum(expected.values()))

    share = 0.5 * gib
    kv_one = 2 * LAYERS * KV * HEAD_DIM * 2 * 2048  # K and V, bf16, one 2048-token sequence
    vllm_work = 8192 * (4 * H + 2 * INTER) * 2 + 256 * VOCAB * 4 + GIB
    assert result.part("vLLM share").bytes == pytest.approx(share)
    assert result.part("vLLM weights").bytes == pytest.approx(PARAMS * 2)
    assert result.part("vLLM working memory").bytes == pytest.approx(vllm_work)
    assert result.part("KV cache, one 2048-token").bytes == pytest.approx(kv_one)
    assert result.rollout_bytes == pytest.approx(share + weights + adam + GIB)  # grads are freed after the update
    # the reference (the lagged teacher) lives in host RAM, fp32, both shards on this node
    assert result.part("reference model").bytes == pytest.approx(PARAMS * 4)
    assert result.host_bytes_per_node == pytest.approx(PARAMS * 4)
    assert result.fits and result.verdict.startswith("fits:")


def test_topk_buffers_lora_and_the_teachers_own_weights(round_model):
    base = [f"actor_rollout_ref.model.path={round_model}", "data.max_prompt_length=1024",
            "data.max_response_length=1024", "actor_rollout_ref.rollout.max_model_len=2048", *FIXED]
    topk = planned("hint_sd", [*base, "hindsight.distill.divergence=topk_tail", "hindsight.distill.topk=8"],
                   gpus=1, gpu_mem=80, targeted_frac=0.5)
    update_tokens = 4 * 2048
    targeted = 0.5 * update_tokens * 1024 / 2048  # half of the response tokens
    assert topk.part("top-k buffers").bytes == pytest.approx(targeted * VOCAB * 4 + update_tokens * 8 * 12)

    # an EMA teacher with a KL to the reference gets its own fp32 copy next to the reference, in host RAM
    kl = planned("hint_sd", [*base, "actor_rollout_ref.actor.use_kl_loss=true"], gpus=1, gpu_mem=80)
    assert kl.part("ema teacher's own weights").bytes == pytest.approx(PARAMS * 4)
    assert kl.host_bytes_per_node == pytest.approx(2 * PARAMS * 4)

    # LoRA: gradients and Adam state of the adapter only; the reference is the actor (no host copy); the EMA
    # teacher is a second adapter; vLLM's weights wait in host RAM while the actor trains (sleep level 1)
    lora = planned("hint_sd", [*base, "actor_rollout_ref.model.lora_rank=8"], gpus=1, gpu_mem=80)
    adapter = LAYERS * 8 * ((H + H) + 2 * (H + KV * HEAD_DIM) + (H + H) + 2 * (H + INTER) + (INTER + H))
    assert lora.part("actor weights").bytes == pytest.approx(PARAMS * 4)
    assert lora.part("actor gradients").bytes == pytest.approx(adapter * 4)
    assert lora.part("Adam state").bytes == pytest.approx(adapter * 8)
    assert lora.part("ema teacher's own weights").bytes == pytest.approx(adapter * 4)
    assert lora.part("vLLM weights asleep").bytes == pytest.approx(PARAMS * 2)
    with pytest.raises(KeyError):
        lora.part("reference model")


def test_dynamic_batches_ulysses_and_offload_change_the_right_parts(round_model):
    base = [f"actor_rollout_ref.model.path={round_model}", "data.max_prompt_length=1024",
            "data.max_response_length=1024", "actor_rollout_ref.rollout.max_model_len=2048", *FIXED]
    dyn = planned("grpo", [*base, "actor_rollout_ref.actor.use_dynamic_bsz=true",
                           "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=4096"], gpus=4, gpu_mem=80)
    assert dyn.part("logits").bytes == pytest.approx(4096 * VOCAB * 6)  # log-prob budgets follow the actor's
    entropy = planned("grpo", [*base, "actor_rollout_ref.actor.use_dynamic_bsz=true",
                               "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=4096",
                               "actor_rollout_ref.actor.entropy_coeff=0.01"], gpus=4, gpu_mem=80)
    assert entropy.part("logits").bytes == pytest.approx(4096 * VOCAB * (6 + 4))  # + the fp32 softmax
    assert dyn.part("actor weights").bytes == pytest.approx(PARAMS * 4 / 4)
    with pytest.raises(KeyError):  # grpo without KL: no reference model
        dyn.part("reference model")
    sp = planned("grpo", [*base, "actor_rollout_ref.actor.ulysses_sequence_parallel_size=2"], gpus=4, gpu_mem=80)
    assert sp.part("logits").bytes == pytest.approx(8 * 2048 / 2 * VOCAB * 6)  # rows split over the SP pair
    assert sp.part("actor weights").bytes == pytest.approx(PARAMS * 4 / 4)  # FSDP still shards over all 4
    plain = planned("grpo", base, gpus=4, gpu_mem=80)
    off = planned("grpo", [*base, "actor_rollout_ref.actor.fsdp_config.param_offload=true",
                           "actor_rollout_ref.actor.fsdp_config.optimizer_offload=true"], gpus=4, gpu_mem=80)
    # verl loads them back for the update: the training phase is unchanged, the rollout phase loses them
    assert off.training_bytes == pytest.approx(plain.training_bytes)
    assert plain.rollout_bytes == pytest.approx(plain.part("vLLM share").bytes + PARAMS * 4 * 3 / 4 + GIB)
    assert off.rollout_bytes == pytest.approx(off.part("vLLM share").bytes + GIB)
    assert off.part("actor weights (param_offload)").bytes == pytest.approx(PARAMS * 4)
    policy = planned("grpo", [*base, "actor_rollout_ref.actor.fsdp_config.offload_policy=true"], gpus=4, gpu_mem=80)
    assert policy.part("actor weights").bytes == 0 and policy.part("Adam state").bytes == 0
    assert policy.part("actor weights + grads + Adam").bytes == pytest.approx(4 * PARAMS * 4)


def test_unset_max_model_len_is_the_reason_a_4b_recipe_does_not_fit_one_80gb_gpu(capsys):
    assert main(["plan", "bfcl/serl", *UNSIZED, "--gpus", "1", "--gpu-mem", "80"]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("does not fit: vLLM KV cache for one 262144-token sequence needs 36.0 GiB of ")
    assert "set actor_rollout_ref.rollout.max_model_len=12288" in out[-1]
    assert any(line.startswith("note: actor_rollout_ref.rollout.max_model_len is unset") for line in out)

    # overrides may also follow the options
    assert main(["plan", "bfcl/serl", *FIXED, "--gpus", "1", "--gpu-mem", "80",
                 "actor_rollout_ref.rollout.max_model_len=12288"]) == 1
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("does not fit: training phase (logits of ")
    assert "rollout.max_model_len" not in last and "use_dynamic_bsz=true" in last

    # following each knob in turn ends in a plan that fits
    overrides = [*FIXED, "actor_rollout_ref.rollout.max_model_len=12288"]
    for _ in range(3):
        result = planned("bfcl/serl", overrides, gpus=1, gpu_mem=80)
        if result.fits:
            break
        knob = result.problems[0].knob
        overrides += [word for word in knob.split() if word.startswith("actor_rollout_ref.")]
    assert result.fits, result.verdict
    assert "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=12288" in overrides


def test_vllm_weights_larger_than_the_share_name_tensor_parallelism():
    result = planned("alfworld/serl", ["actor_rollout_ref.rollout.tensor_model_parallel_size=1"], gpus=8, gpu_mem=24)
    knobs = [p.knob for p in result.problems if p.part.startswith("vLLM weights")]
    assert knobs and knobs[0].startswith("set actor_rollout_ref.rollout.tensor_model_parallel_size=2")


def test_weights_too_big_for_one_gpu_name_more_gpus_and_eight_fit(capsys):
    one_gpu = ["actor_rollout_ref.rollout.tensor_model_parallel_size=1"]
    assert main(["plan", "alfworld/serl", *one_gpu, "--gpus", "1", "--gpu-mem", "80"]) == 1
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "fp32 weights, gradients and Adam state: 113.5 GiB" in last
    assert "more GPUs: the run fits on 4 (trainer.n_gpus_per_node=4)" in last and "offload_policy=true" in last
    assert main(["plan", "alfworld/serl", "--gpus", "8", "--gpu-mem", "80"]) == 0
    out = capsys.readouterr().out
    assert "8 GPU(s) x 1 node(s)" in out and out.strip().splitlines()[-1].startswith("fits:")
    # an override of trainer.n_gpus_per_node wins over --gpus
    assert main(["plan", "alfworld/serl", "trainer.n_gpus_per_node=8", "--gpus", "1", "--gpu-mem", "80"]) == 0
    assert "8 GPU(s) x 1 node(s)" in capsys.readouterr().out


def test_bad_input_is_exit_2_with_one_line_naming_the_field(capsys):
    assert main(["plan", "serl", "actor_rollout_ref.model.path=nosuch/Model-7B", "--gpu-mem", "80"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "actor_rollout_ref.model.path=nosuch/Model-7B" in err[0]
    assert "pass a local model folder" in err[0]
    assert main(["plan", "nosuch_recipe", "--gpu-mem", "80"]) == 2
    assert "RECIPE nosuch_recipe" in capsys.readouterr().err
    assert main(["plan", "serl", "--gpu-mem", "80", "--targeted-frac", "2"]) == 2
    assert "--targeted-frac" in capsys.readouterr().err
    assert main(["plan", "serl", "actor_rollout_ref.rollout.max_model_len=99999999", "--gpu-mem", "80"]) == 2
    assert "max_position_embeddings" in capsys.readouterr().err
    with pytest.raises(PlanInputError, match="actor_rollout_ref.model.path"):
        model_shape("nosuch/Model-7B")


def test_the_installed_command_exits_2_on_an_unknown_model():
    exe = Path(sys.executable).parent / "verl-hindsight"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "verl_hindsight.cli"]
    result = subprocess.run([*cmd, "plan", "serl", "actor_rollout_ref.model.path=nosuch/Model", "--gpu-mem", "80"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "local model folder" in result.stderr


def test_shape_from_a_local_config_follows_its_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "qwen3", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 32, "intermediate_size": 128, "vocab_size": 100,
        "tie_word_embeddings": True, "max_position_embeddings": 4096}))
    shape = model_shape(str(tmp_path))
    assert isinstance(shape, ModelShape) and shape.qk_norm and not shape.qkv_bias and shape.q_dim == 128
    layer = 64 * 128 + 2 * 64 * 64 + 128 * 64 + 2 * 32 + 3 * 64 * 128 + 2 * 64  # q/k/v/o, q/k norms, MLP, norms
    assert shape.params() == 100 * 64 + 2 * layer + 64
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path))
    assert shape.params() == sum(p.numel() for p in model.parameters())
