"""Sleep training of a pretrained checkpoint (model/finetune.py, model/data.py): a tiny random Qwen3.5
saved by transformers trains through `sleepserve train --init-from` and comes back in its own layout;
gradients through every sleep pass against finite differences; checkpointing and bf16 autocast; the
chat loss mask."""

from __future__ import annotations

import dataclasses
import json
import random
import re

import pytest
import torch
from qwen_support import hf_model, make_checkpoint
from safetensors.torch import load_file

from model.checkpoint import load_checkpoint
from model.data import render_chat, render_example, render_text
from model.finetune import FinetuneConfig, parse_args, sequence_loss, start_stage, train_step
from model.loading import load_model, read_weights, save_model
from model.tasks import make_task
from model.tokenizer import END_OF_MESSAGE, HFTokenizer
from model.train import main as train_main

torch.set_num_threads(1)

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And the quick brown fox?"},
    {"role": "assistant", "content": "It jumps over the lazy dog."},
]
TEXTS = [
    "The quick brown fox jumps over the lazy dog. Sleep consolidates the window into fast weights.",
    "Hello, world! A conversation goes on and on, one turn after another, and the window moves on.",
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("qwen"), seed=3)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "mix.jsonl"
    lines = [{"text": t} for t in TEXTS] + [{"messages": CHAT}]
    path.write_text("\n".join(json.dumps(line) for line in lines * 2) + "\n")
    return path


def gdn_layers(config) -> list[int]:
    return [i for i, kind in enumerate(config.layers) if kind == "gdn"]


# -- training -------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["hard", "lagged"])
def test_loss_falls_on_a_fixed_batch(checkpoint, schedule) -> None:
    """Targets only in the last window: everything they depend on before it was slept on (N = 2, the
    middle blocks looped), in two micro-batches."""
    torch.manual_seed(0)
    model = load_model(checkpoint, window=8, schedule=schedule, sleep_passes=2, sleep_blocks=(1, 3)).model
    model.train()
    tokens = torch.randint(3, 300, (4, 40))
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, 33:] = True
    config = FinetuneConfig(str(checkpoint), batch_size=4, accumulate=2, muon_lr=2e-2, adamw_lr=2e-2)
    optimizers = start_stage(model, config, warmup=False)
    losses = [train_step(model, optimizers, tokens, mask, config, passes=2)[0] for _ in range(6)]
    assert losses[-1] < 0.8 * losses[0], losses


def run_cli(checkpoint, data_file, out, *extra: str, blocks: str = "3") -> None:
    train_main(
        [
            "--init-from", str(checkpoint), "--data", str(data_file), "--task", "recall",
            "--window", "32", "--schedule", "hard", "--passes", "2", "--sleep-blocks", "1", blocks,
            "--sequence-windows", "2", "--batch-size", "2", "--muon-lr", "1e-2", "--adamw-lr", "1e-2",
            "--out", str(out), *extra,
        ]
    )  # fmt: skip


def test_warm_up_stage_changes_only_its_named_parameters(checkpoint, data_file, tmp_path) -> None:
    """Two warm-up steps of a lagged run: hard eviction, only the named parameters change."""
    run_cli(
        checkpoint, data_file, tmp_path, "--warmup-params", "blocks.*.mixer.A_log", "blocks.*.mixer.dt_bias",
        "--warmup-steps", "2", "--steps", "0", "--schedule", "lagged",
    )  # fmt: skip
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["schedule"], r["source"]) for r in log] == [
        ("warmup", "hard", "data"), ("warmup", "hard", "recall"),
    ]  # fmt: skip
    assert json.loads((tmp_path / "config.json").read_text())["sleepserve"]["schedule"] == "lagged"
    before, after = load_file(checkpoint / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert before.keys() == after.keys()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    config = load_model(checkpoint).model.config
    assert changed == {
        f"model.layers.{i}.linear_attn.{p}" for i in gdn_layers(config) for p in ("A_log", "dt_bias")
    }


def test_trained_checkpoint_loads_in_the_server_and_in_transformers(checkpoint, data_file, tmp_path) -> None:
    """Saved in transformers' own layout with the sleep settings it was trained with, which the server's
    loader takes as its defaults; transformers reads the same weights: equal logits within the window."""
    run_cli(checkpoint, data_file, tmp_path, "--steps", "2")
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["sleepserve"] == {
        "window": 32, "schedule": "hard", "sleep_passes": 2, "sleep_blocks": [1, 3], "variable_chunks": False,
    }  # fmt: skip
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= {
        p.name for p in tmp_path.iterdir()
    }
    loaded = load_model(tmp_path)
    config = loaded.model.config
    assert (config.window, config.schedule, config.sleep_passes, config.sleep_blocks) == (
        32,
        "hard",
        2,
        (1, 3),
    )
    before = load_file(checkpoint / "model.safetensors")
    after = load_file(tmp_path / "model.safetensors")
    assert all(not torch.equal(before[n], after[n]) for n in before if n.endswith("mlp.up_proj.weight"))
    tokens = torch.tensor([loaded.tokenizer.encode("The quick brown fox jumps over")])
    assert tokens.shape[1] <= 32
    with torch.no_grad():
        ours = loaded.model(tokens, loaded.model.empty_memory(1))
        theirs = hf_model(tmp_path)(tokens).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_a_native_checkpoint_trains_the_same_way(tiny_checkpoint, data_file, tmp_path) -> None:
    """The sleepy family (byte tokenizer, its own chat format) through the same command: the result is a
    native checkpoint with the new sleep settings in its config."""
    source = tiny_checkpoint(schedule="lagged")
    run_cli(source, data_file, tmp_path, "--steps", "2", blocks="2")
    trained = load_checkpoint(tmp_path)
    assert (trained.config.window, trained.config.schedule, trained.config.sleep_blocks) == (
        32,
        "hard",
        (1, 2),
    )
    before = load_checkpoint(source).state_dict()
    assert any(not torch.equal(before[n], t) for n, t in trained.state_dict().items())
    assert load_model(tmp_path).family == "sleepy"


def test_save_model_keeps_the_hub_layout(tmp_path) -> None:
    """A `qwen3_5` VLM checkpoint (two shards, tied embeddings, vision and MTP tensors) comes back with
    the same names and dtypes, the skipped tensors as they were, the changed weights in place."""
    source = make_checkpoint(tmp_path / "source", layout="vlm", tied=True)
    model = load_model(source, window=16).model
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param))
    save_model(model, source, tmp_path / "out")
    original = {name: t for name, t in read_weights(source)}
    saved = load_file(tmp_path / "out" / "model.safetensors")
    assert saved.keys() == original.keys()
    assert all(saved[n].dtype == t.dtype for n, t in original.items())
    assert torch.equal(saved["mtp.fc.weight"], original["mtp.fc.weight"])
    reloaded = load_model(tmp_path / "out").model
    assert reloaded.config.window == 16 and reloaded.config.tie_embeddings
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


def test_resume_continues_the_same_run(checkpoint, data_file, tmp_path) -> None:
    run_cli(checkpoint, data_file, tmp_path / "straight", "--steps", "3")
    run_cli(checkpoint, data_file, tmp_path / "resumed", "--steps", "2", "--save-every", "1")
    run_cli(checkpoint, data_file, tmp_path / "resumed", "--steps", "3", "--resume")
    straight = load_file(tmp_path / "straight" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], atol=1e-6, rtol=0)


# -- gradients ------------------------------------------------------------------------------------


def first_window_case(checkpoint, dtype, **sleep):
    """A model with window 4 and three windows of tokens: the first window's tokens (ids 100-103) appear
    nowhere else, and only the last window's tokens are targets, so the loss reaches the first window
    only through its sleep."""
    model = load_model(checkpoint, dtype=dtype, window=4, **sleep).model.train()
    tokens = torch.tensor([[100, 101, 102, 103, 210, 220, 230, 240, 250, 260, 270, 280]])
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, 9:] = True
    return model, tokens, mask


@pytest.mark.parametrize(
    "sleep",
    [
        {"schedule": "hard", "sleep_passes": 1},
        {"schedule": "hard", "sleep_passes": 3},
        {"schedule": "hard", "sleep_passes": 3, "sleep_blocks": (1, 3)},
        {"schedule": "lagged", "sleep_passes": 2},
    ],
    ids=["hard-n1", "hard-n3", "hard-n3-looped", "lagged-n2"],
)
def test_gradients_reach_the_first_window_through_every_pass(checkpoint, sleep) -> None:
    """d loss / d (embeddings of the first window's tokens), through N sleep passes under activation
    checkpointing, equals central finite differences (float64) along a random direction."""
    model, tokens, mask = first_window_case(checkpoint, torch.float64, **sleep)
    passes = model.config.sleep_passes
    loss, _ = sequence_loss(model, tokens, mask, passes, checkpointing=True)
    loss.backward()
    rows = slice(100, 104)
    grad = model.embed.weight.grad[rows]
    assert grad.abs().max() > 1e-6
    direction = torch.randn(grad.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    eps = 1e-7  # the loss curves fast with N = 3: its error is O(eps²)
    values = []
    with torch.no_grad():
        for sign in (1, -1):
            model.embed.weight[rows] += sign * eps * direction
            values.append(sequence_loss(model, tokens, mask, passes)[0].item())
            model.embed.weight[rows] -= sign * eps * direction
    numeric = (values[0] - values[1]) / (2 * eps)
    analytic = (grad * direction).sum().item()
    assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(analytic)), (numeric, analytic)


def test_activation_checkpointing_gives_the_same_gradients(checkpoint) -> None:
    grads = []
    for checkpointing in (False, True):
        model, tokens, mask = first_window_case(checkpoint, torch.float32, schedule="lagged", sleep_passes=2)
        mask[:, 5:] = True
        sequence_loss(model, tokens, mask, 2, checkpointing=checkpointing)[0].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5, msg=name)


def saved_bytes(model, tokens, mask, passes: int, checkpointing: bool) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of one sequence's loss."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        sequence_loss(model, tokens, mask, passes, checkpointing=checkpointing)
    return total


def test_checkpointed_memory_does_not_grow_with_the_passes(checkpoint) -> None:
    """With checkpointing autograd keeps each window's inputs and the memory at each boundary, the same
    for N = 1 and N = 4; without, every pass's activations (the case would fail were it not in effect)."""
    model, tokens, mask = first_window_case(checkpoint, torch.float32, schedule="hard", sleep_passes=1)
    kept = {(n, c): saved_bytes(model, tokens, mask, n, c) for n in (1, 4) for c in (False, True)}
    assert kept[(1, True)] == kept[(4, True)] < kept[(1, False)] < kept[(4, False)]


def test_gradient_accumulation_gives_the_same_gradients(checkpoint) -> None:
    """Two micro-batches with different numbers of targets: the step's gradient (the mean over all the
    batch's targets, clipped) is the one of the whole batch at once."""
    config = FinetuneConfig(str(checkpoint), batch_size=4, muon_lr=1e-2, adamw_lr=1e-2)
    tokens = torch.randint(3, 300, (4, 16), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[0, :10] = False  # micro-batches with different numbers of targets
    grads, losses = [], []
    for accumulate in (1, 2):
        model = load_model(checkpoint, window=8, schedule="lagged", sleep_passes=2).model.train()
        step_config = dataclasses.replace(config, accumulate=accumulate)
        loss, _ = train_step(
            model, start_stage(model, step_config, warmup=False), tokens, mask, step_config, 2
        )
        losses.append(loss)
        grads.append({name: p.grad for name, p in model.named_parameters()})
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_bf16_autocast_keeps_the_state_fp32(checkpoint) -> None:
    """Under bf16 autocast the projections run in bf16, the delta rule and the memory it returns in
    float32: exactly what it computes without autocast on the same inputs."""
    model, tokens, mask = first_window_case(checkpoint, torch.float32, schedule="hard", sleep_passes=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        memory = model.sleep(model.empty_memory(1), tokens[:, :4], 2)
        block = model.blocks[gdn_layers(model.config)[0]]
        x = block.mixer_norm(model.embed(tokens[:, :8]))
        inputs = block.mixer.project(x)[:5]
        assert block.mixer.qkv(x).dtype == torch.bfloat16  # the projections do run in bf16
        _, fast = block.mixer.delta_rule(*inputs, memory[0])
        loss, _ = sequence_loss(model, tokens, mask, 2, checkpointing=True)
    assert all(m.dtype == torch.float32 for m in memory) and fast.dtype == torch.float32
    _, exact = block.mixer.delta_rule(*inputs, memory[0])
    assert torch.equal(fast, exact)
    loss.backward()
    assert model.embed.weight.grad.dtype == torch.float32 and model.embed.weight.grad[100:104].abs().max() > 0


# -- data -----------------------------------------------------------------------------------------


def test_chat_loss_mask_covers_exactly_the_assistant_turns(checkpoint) -> None:
    tokenizer = HFTokenizer(checkpoint)
    ids, mask = render_chat(tokenizer, CHAT)
    assert ids == tokenizer.encode_chat(CHAT, add_generation_prompt=False)
    spelled = [tokenizer.tokenizer.decode(r, skip_special_tokens=False) for r in marked_runs(ids, mask)]
    assert spelled == [m["content"] + "<|im_end|>" for m in CHAT if m["role"] == "assistant"]
    with pytest.raises(ValueError, match="assistant"):
        render_chat(tokenizer, CHAT[:2])
    text_ids, text_mask = render_text(tokenizer, TEXTS[0])
    assert all(text_mask) and text_ids[-1] in tokenizer.eos_ids


# Qwen's way: the last assistant turn gets an (empty) thinking block that the earlier ones lose, so a
# conversation does not render as the prefix of its continuation.
THINKING_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' and loop.last %}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
)


def marked_runs(ids: list[int], mask: list[bool]) -> list[list[int]]:
    runs: list[list[int]] = []
    for i, (token, target) in enumerate(zip(ids, mask, strict=True)):
        if target:
            if i == 0 or not mask[i - 1]:
                runs.append([])
            runs[-1].append(token)
    return runs


def test_chat_mask_with_a_template_that_rewrites_earlier_turns(checkpoint) -> None:
    """A user message that quotes the assistant's next answer is not marked; the thinking block is not."""
    tokenizer = HFTokenizer(checkpoint)
    tokenizer.tokenizer.chat_template = THINKING_TEMPLATE
    chat = [*CHAT[:3], {"role": "user", "content": "Say 'It jumps over the lazy dog.' again"}, CHAT[4]]
    ids, mask = render_chat(tokenizer, chat)
    spelled = [tokenizer.tokenizer.decode(r, skip_special_tokens=False) for r in marked_runs(ids, mask)]
    assert spelled == ["It is 4.<|im_end|>", "It jumps over the lazy dog.<|im_end|>"]


def test_native_chat_mask(tiny_checkpoint) -> None:
    """The byte-level chat format: each assistant turn's bytes and its end-of-message token."""
    tokenizer = load_model(tiny_checkpoint()).tokenizer
    ids, mask = render_chat(tokenizer, CHAT)
    assert ids == tokenizer.encode_chat(CHAT, add_generation_prompt=False)
    runs = marked_runs(ids, mask)
    assert [tokenizer.decode(r) for r in runs] == [m["content"] for m in CHAT if m["role"] == "assistant"]
    assert all(r[-1] == END_OF_MESSAGE for r in runs)


def test_task_windows_become_model_windows(checkpoint) -> None:
    """Each task window fills one model window (left-padded), so the facts are evicted before the query;
    only the answer is a target."""
    tokenizer = HFTokenizer(checkpoint)
    task = make_task("recall", window=40)
    example = task.example(random.Random(0))
    ids, mask = render_example(tokenizer, example, task.window, 40)
    windows = len(example.context) // task.window
    answer = tokenizer.encode(example.answer)
    assert len(ids) == windows * 40 + len(tokenizer.encode(example.query)) + len(answer)
    assert [i for i, m in zip(ids, mask, strict=True) if m] == answer
    for w in range(windows):
        text = tokenizer.decode(ids[w * 40 : (w + 1) * 40])
        assert re.sub(r"^\.+", "", text) == re.sub(r"^\.+", "", example.context[w * 40 : (w + 1) * 40])


def test_gpu_preset_and_flags_over_it() -> None:
    config, out, resume = parse_args(
        ["--init-from", "Qwen/Qwen3.5-0.8B-Base", "--preset", "gpu", "--passes", "4", "--out", "runs/q"]
    )
    assert (config.window, config.schedule, config.sleep_blocks, config.passes) == (2048, "hard", (6, 18), 4)
    assert config.bf16 and config.device == "cuda" and config.warmup_steps > 0 and "recall" in config.tasks
    assert str(out) == "runs/q" and not resume
