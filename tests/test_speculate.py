"""Speculative decoding: the target's cached multi-token forward and rollback, the draft's cached chain against its
training-time test, the sampling rule, greedy outputs equal to plain greedy decoding, and tools/speculate.py."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from vlm_train.cli.speculate import main
from vlm_train.data.batch import IGNORE_INDEX, PackedBatch
from vlm_train.data.loader import pack_for_generation
from vlm_train.inference import load_draft
from vlm_train.jsonio import dumps
from vlm_train.model import VLM
from vlm_train.model.attachments import detached
from vlm_train.model.draft import DraftInputs, DraftShapeConfig, Eagle3Draft, draft_losses, draft_of
from vlm_train.model.generate import SamplingConfig, generate
from vlm_train.model.speculative import (
    Eagle3Proposer,
    Proposal,
    accept_tokens,
    run_speculative,
    sampled_verify,
    speculative_generate,
)
from vlm_train.train.builders import add_draft
from vlm_train.train.checkpoint import Checkpointer
from vlm_train.train.config import CheckpointConfig, Config, Eagle3Config
from vlm_train.train.draft_objective import choose_vocabulary, step_masks, target_distribution, target_features

from helpers import encoder, sample, tiny_tokenizer
from tools_helpers import SMALL, save_run, write_shard

ROOT = Path(__file__).resolve().parents[1]
# Three layers, so the draft's default layers (first, middle, last) are three distinct ones.
CONFIG = dataclasses.replace(SMALL, llm=dataclasses.replace(SMALL.llm, num_layers=3))
DRAFT_VOCAB = 120
STOPS = {encoder().special.im_end, encoder().special.pad}


def _model(seed: int = 0, scale: float = 0.3) -> VLM:
    """A random VLM (weights pushed off their init, so answers differ by prompt) with a random draft attached."""
    torch.manual_seed(seed)
    model = VLM(CONFIG, vocab_size=len(tiny_tokenizer()), image_token_id=encoder().special.image_pad).eval()
    add_draft(model, Eagle3Config(draft=DraftShapeConfig(draft_vocab_size=DRAFT_VOCAB)))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
        draft = draft_of(model)
        draft.embed_tokens.weight.copy_(model.llm.embed_tokens.weight)  # as a draft stage starts
        draft.set_vocabulary(torch.randperm(len(tiny_tokenizer()))[:DRAFT_VOCAB])
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a shared machine they make the file ten times
    slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> VLM:
    return _model()


@pytest.fixture(scope="module")
def mild() -> VLM:
    """Weights pushed less far: states of a few units, where fp32 sums agree to 1e-6 whatever their order."""
    return _model(scale=0.1)


def _prompts(n: int = 3) -> list[PackedBatch]:
    """Packs of one prompt each: one image, none, two images (M-RoPE positions that skip)."""
    images = (1, 0, 2, 1)
    enc = encoder()
    return [pack_for_generation(enc, [sample(f"s{i}", "x", images=images[i], seed=i)]) for i in range(n)]


def _full_forward(llm, embeds: torch.Tensor, positions: torch.Tensor, capture=()):
    n = embeds.shape[0]
    return llm.forward_capture(embeds, positions, torch.tensor([0, n], dtype=torch.int32), n, capture)


def _extended_positions(prompt_positions: torch.Tensor, count: int) -> torch.Tensor:
    start = prompt_positions.max() + 1
    return torch.cat([prompt_positions, (start + torch.arange(count)).expand(3, -1)], dim=1)


# ---- the target: several new tokens against the cache, and rollback ---------------------------------------------


def test_extend_gives_the_logits_and_layers_of_a_full_forward_and_rollback_then_continue_equals_a_fresh_run(mild):
    model = mild
    llm, layers = model.llm, (0, 1, 2)
    prompt = _prompts(1)[0]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        embeds = model.embed(prompt)
        cache = llm.new_cache(prompt.num_tokens + 10)
        final, captured = llm.prefill_capture(
            embeds, prompt.position_ids, prompt.cu_seqlens, prompt.max_seqlen, cache, layers
        )
        reference = llm.prefill(embeds, prompt.position_ids, prompt.cu_seqlens, prompt.max_seqlen, llm.new_cache(99))
        torch.testing.assert_close(final, reference, atol=0, rtol=0)  # prefill is prefill_capture's first half
        first = torch.randint(6, 300, (4,), generator=gen)
        new_final, new_captured = llm.extend(llm.embed(first)[None], cache, layers)
        full_final, full_captured = _full_forward(
            llm, torch.cat([embeds, llm.embed(first)]), _extended_positions(prompt.position_ids, 4), layers
        )
        torch.testing.assert_close(llm.logits(new_final[0]), llm.logits(full_final[-4:]), atol=1e-5, rtol=1e-5)
        for ours, theirs in zip(new_captured, full_captured):
            torch.testing.assert_close(ours[0], theirs[-4:], atol=1e-5, rtol=1e-5)
        for ours, theirs in zip(captured, full_captured):
            torch.testing.assert_close(ours, theirs[: prompt.num_tokens], atol=1e-5, rtol=1e-5)

        # Keep two of the four, then three other tokens: as if they had followed the two all along.
        cache.truncate(prompt.num_tokens + 2)
        assert int(cache.next_position[0]) == int(prompt.position_ids.max()) + 3
        then = torch.randint(6, 300, (3,), generator=gen)
        again, _ = llm.extend(llm.embed(then)[None], cache)
        tokens = torch.cat([first[:2], then])
        fresh, _ = _full_forward(
            llm, torch.cat([embeds, llm.embed(tokens)]), _extended_positions(prompt.position_ids, 5)
        )
        torch.testing.assert_close(llm.logits(again[0]), llm.logits(fresh[-3:]), atol=1e-5, rtol=1e-5)
        # One token by extend is one decode step.
        step = llm.decode_step(llm.embed(torch.tensor([7])), cache)
        fresh, _ = _full_forward(
            llm,
            torch.cat([embeds, llm.embed(torch.cat([tokens, torch.tensor([7])]))]),
            _extended_positions(prompt.position_ids, 6),
        )
        torch.testing.assert_close(llm.logits(step), llm.logits(fresh[-1:]), atol=1e-5, rtol=1e-5)

    with pytest.raises(ValueError, match="must keep its prompt"):
        cache.truncate(prompt.num_tokens - 1)
    with pytest.raises(ValueError, match="cannot grow"):
        cache.truncate(prompt.num_tokens + 7)


def test_extend_handles_a_batch_of_rows_of_different_lengths(mild):
    model = mild
    llm = model.llm
    enc = encoder()
    prompts = pack_for_generation(enc, [sample(f"s{i}", "x", images=n, seed=i) for i, n in enumerate((1, 0))])
    new = torch.tensor([[11, 12, 13], [21, 22, 23]])
    with torch.no_grad():
        embeds = model.embed(prompts)
        cache = llm.new_cache(prompts.max_seqlen + 3)
        llm.prefill(embeds, prompts.position_ids, prompts.cu_seqlens, prompts.max_seqlen, cache)
        out, _ = llm.extend(llm.embed(new), cache)
        cu = prompts.cu_seqlens.tolist()
        for row, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
            positions = _extended_positions(prompts.position_ids[:, a:b], 3)
            full, _ = _full_forward(llm, torch.cat([embeds[a:b], llm.embed(new[row])]), positions)
            torch.testing.assert_close(llm.logits(out[row]), llm.logits(full[-3:]), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="KV cache full"):
        llm.extend(llm.embed(new), cache)


# ---- the draft: its cached chain is its training-time test ------------------------------------------------------


def test_the_drafts_cached_chain_equals_its_training_time_test():
    """Step j of `ttt` at index t is the chain's j-th output when the cache holds indices 0..t, fed the same tokens;
    one proposer is carried along the sample, so its rollback of each chain is checked too."""
    torch.manual_seed(3)
    draft = Eagle3Draft(CONFIG.llm, DraftShapeConfig(draft_vocab_size=DRAFT_VOCAB), len(tiny_tokenizer())).eval()
    with torch.no_grad():
        for weight in draft.parameters():
            if weight.dim() == 2:  # N(0, 0.1): steps that differ clearly, in states small enough for fp32 at 1e-5
                weight.normal_(0.0, 0.1)
    steps, length = 4, 14
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 300, (length,), generator=gen)
    aux = torch.randn(length, 3 * CONFIG.llm.hidden_size, generator=gen)
    positions = torch.arange(length).expand(3, -1).clone()
    positions[1:, 2:6] += torch.tensor([[0, 0, 1, 1], [0, 1, 0, 1]])  # an image's h, w rows
    positions[:, 6:] -= 2  # text after the image: one past its largest position
    with torch.no_grad():
        outs = draft.ttt(ids, aux, positions, torch.tensor([0, length], dtype=torch.int32), steps)
        assert float((outs[1] - outs[0]).abs().max()) > 0.5  # each step tells the test something
        proposer = Eagle3Proposer(draft)
        given = 0
        for t in (0, 1, 4, 5, 6, 9):  # several new indices at once, and one at a time
            hidden = proposer.extend(ids[given + 1 : t + 2], aux[given : t + 1], positions[:, given : t + 1])
            given = t + 1
            torch.testing.assert_close(hidden[0], outs[0][t], atol=1e-5, rtol=1e-5)
            for j in range(1, steps):
                hidden = proposer.step(ids[t + 1 + j].view(1), hidden, positions[:, t : t + 1] + j)
                torch.testing.assert_close(hidden[0], outs[j][t], atol=1e-5, rtol=1e-5)
            assert proposer.cache.length == t + steps  # the chain's entries, dropped by the next extend

        # A proposal is the training-time test fed the draft's own guesses: its argmax chain when greedy, its
        # distributions (over target ids) when sampling.
        draft.set_vocabulary(torch.arange(DRAFT_VOCAB) * 2)
        t, cu = 6, torch.tensor([0, length], dtype=torch.int32)
        for temperature in (0.0, 1.0):
            proposer = Eagle3Proposer(draft, temperature, torch.Generator().manual_seed(0))
            proposal = proposer.propose(ids[1 : t + 2], aux[: t + 1], positions[:, : t + 1], steps)
            own = ids.clone()
            own[t + 2 : t + 1 + steps] = torch.tensor(proposal.tokens[:-1])
            logits = torch.stack([draft.logits(out[t]) for out in draft.ttt(own, aux, positions, cu, steps)])
            if temperature == 0:
                assert proposal.tokens == draft.draft_to_target[logits.argmax(-1)].tolist()
                assert proposal.probs is None
            else:
                expected = torch.zeros_like(proposal.probs)
                expected[:, draft.draft_to_target] = torch.softmax(logits, -1)
                torch.testing.assert_close(proposal.probs, expected, atol=1e-6, rtol=1e-5)


# ---- greedy: the target's own output ----------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_speculative_output_is_the_targets_greedy_output(model, k):
    draft = draft_of(model)
    cfg = SamplingConfig(max_new_tokens=12)
    answers = []
    for prompt in _prompts(3):
        reference = generate(model, prompt, cfg, STOPS)[0]
        out = speculative_generate(model, draft, prompt, cfg, STOPS, k, feature_dtype=torch.bfloat16)
        assert out.tokens == reference
        assert out.stats.verifications >= math.ceil((len(reference) - 1) / (k + 1))
        assert len(out.stats.accept_rate_per_position) == k
        answers.append(tuple(reference))
    assert len(set(answers)) == 3 and all(len(a) > 3 for a in answers)  # the prompts tell the test something


class Scripted:
    """A proposer that knows the target's greedy continuation and guesses it, wrong wherever `wrong(i)` holds
    for the answer index i: every kind of partial acceptance and rollback on demand."""

    def __init__(self, prompt_length: int, answer: list[int], wrong=lambda i: False):
        self.prompt_length, self.answer, self.wrong = prompt_length, answer, wrong
        self.seen = 0
        self.received: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def propose(self, tokens, features, positions, k) -> Proposal:
        assert tokens.shape[0] == features.shape[0] == positions.shape[1] > 0
        self.received.append((tokens, features, positions))
        self.seen += tokens.shape[0]  # the newest token sits at index `seen`: answer index seen - prompt_length
        start = self.seen - self.prompt_length + 1
        guesses = [self.answer[i] if i < len(self.answer) else 9 for i in range(start, start + k)]
        return Proposal([(g + 1) % 300 if self.wrong(start + i) else g for i, g in enumerate(guesses)])


@pytest.mark.parametrize("k", [1, 3, 5])
def test_acceptance_follows_the_guesses_and_the_output_never_changes(model, k):
    """A perfect proposer is kept whole (1 + K tokens per forward), a wrong one never (1), a half-right one in
    between; the output is the target's greedy output every time."""
    prompt = _prompts(1)[0]
    n = 20
    # No stop token, so the answer goes on past n and every verification can be judged in full.
    answer = generate(model, prompt, SamplingConfig(n + k + 1), [])[0]
    cfg = SamplingConfig(max_new_tokens=n)
    layers, dtype = draft_of(model).target_layers, torch.bfloat16
    cases = {"perfect": lambda i: False, "wrong": lambda i: True, "half": lambda i: i % 3 == 1}
    lengths = {}
    for name, wrong in cases.items():
        proposer = Scripted(prompt.num_tokens, answer, wrong)
        out = run_speculative(model, prompt, proposer, cfg, [], k, layers, dtype)
        assert out.tokens == answer[:n], name
        lengths[name] = out.stats.acceptance_length
        if name == "perfect":
            assert out.stats.accept_rate_per_position == [1.0] * k
            assert out.stats.verifications == math.ceil((n - 1) / (k + 1))
        if name == "wrong":
            assert out.stats.accept_rate_per_position == [0.0] + [None] * (k - 1)
            assert out.stats.verifications == n - 1
    assert lengths["perfect"] == 1 + k and lengths["wrong"] == 1
    assert k == 1 or 1 < lengths["half"] < 1 + k

    # What the proposer was given, over the whole run, is what training feeds the draft: at index t the token at
    # t + 1, the target's three layers at t (in the storage dtype) and t's rotary position.
    tokens, features, positions = (
        torch.cat(parts, dim=-1 if i == 2 else 0) for i, parts in enumerate(zip(*proposer.received))
    )
    count = tokens.shape[0]
    sequence = torch.cat([prompt.input_ids, torch.tensor(answer)])
    assert torch.equal(tokens, sequence[1 : count + 1])
    expected_positions = _extended_positions(prompt.position_ids, len(answer))
    assert torch.equal(positions, expected_positions[:, :count])
    with torch.no_grad():
        embeds = torch.cat([model.embed(prompt), model.llm.embed(torch.tensor(answer))])
        _, layers_out = _full_forward(model.llm, embeds[:count], expected_positions[:, :count], layers)
    assert features.dtype == dtype
    torch.testing.assert_close(features.float(), torch.cat(layers_out, -1).to(dtype).float(), atol=0.02, rtol=0.02)


def test_stop_tokens_and_the_token_budget_end_the_output(model):
    prompt = _prompts(1)[0]
    draft = draft_of(model)
    answer = generate(model, prompt, SamplingConfig(10), [])[0]
    early = answer[4]
    cut = answer[: answer.index(early)]
    out = run_speculative(
        model,
        prompt,
        Scripted(prompt.num_tokens, answer),
        SamplingConfig(10),
        {early},
        3,
        draft.target_layers,
        torch.bfloat16,
    )
    assert out.tokens == cut
    assert speculative_generate(model, draft, prompt, SamplingConfig(0), STOPS, 3).tokens == []
    assert speculative_generate(model, draft, prompt, SamplingConfig(1), [], 3).tokens == answer[:1]
    with pytest.raises(ValueError, match="one prompt at a time"):
        speculative_generate(
            model, draft, pack_for_generation(encoder(), [sample("a", "x")] * 2), SamplingConfig(4), STOPS, 3
        )
    with pytest.raises(ValueError, match="top_p"):
        speculative_generate(model, draft, prompt, SamplingConfig(4, 1.0, 0.9), STOPS, 3)


def test_a_draft_trained_by_the_draft_objective_is_accepted():
    """End to end, train and inference agreeing: a draft fitted with the training code (target features in bf16,
    training-time test over the target's greedy answers) has nearly all its guesses kept on those prompts."""
    model, k = _model(seed=4), 4
    draft = draft_of(model)
    stops = STOPS | {encoder().special.image_pad}  # an image-pad token in an answer would not embed as a pack
    cfg = SamplingConfig(24)
    packs, inputs = [], []
    for prompt in _prompts(2):
        answer = torch.tensor(generate(model, prompt, cfg, stops)[0])
        ids = torch.cat([prompt.input_ids, answer])
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[prompt.num_tokens - 1 : -1] = answer  # the answer is supervised, shifted as the loader shifts
        n = ids.numel()
        pack = dataclasses.replace(
            prompt,
            input_ids=ids,
            labels=labels,
            position_ids=_extended_positions(prompt.position_ids, answer.numel()),
            cu_seqlens=torch.tensor([0, n], dtype=torch.int32),
            max_seqlen=n,
            sample_index=torch.zeros(n, dtype=torch.long),
        )
        packs.append(pack)
    draft.set_vocabulary(choose_vocabulary([p.labels for p in packs], DRAFT_VOCAB, len(tiny_tokenizer())))
    for pack in packs:
        features = target_features(model, pack, draft.target_layers, "bfloat16")
        logits, in_vocab = target_distribution(features.final, model.llm.lm_head.weight, draft)
        inputs.append(DraftInputs(features.aux, logits, step_masks(pack, in_vocab, k)))
    trainable = [p for name, p in draft.named_parameters() if not name.startswith("embed_tokens")]
    with torch.no_grad():
        for weight in trainable:
            if weight.dim() == 2:
                weight.normal_(0.0, 0.02)  # a fresh draft, as a draft stage starts
    optimizer = torch.optim.AdamW(trainable, lr=3e-3)
    for step in range(200):
        pack, item = packs[step % 2], inputs[step % 2]
        out = draft_losses(draft, pack.input_ids, pack.position_ids, pack.cu_seqlens, item)
        loss = sum(0.8**j * out.loss_sums[j] / item.masks[j].sum().clamp(min=1) for j in range(k))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    draft.eval()
    for prompt in _prompts(2):
        got = speculative_generate(model, draft, prompt, cfg, stops, k)
        assert got.tokens == generate(model, prompt, cfg, stops)[0]
        assert got.stats.acceptance_length > 3.5, got.stats.accept_rate_per_position


# ---- sampling: the target's distribution ------------------------------------------------------------------------


def test_the_accept_reject_rule_preserves_the_target_distribution():
    """Draw x from q, keep it with probability min(1, p/q), else draw from max(0, p - q): the result follows p,
    including tokens outside the draft vocabulary (q = 0 there)."""
    p = torch.tensor([0.05, 0.30, 0.10, 0.25, 0.20, 0.10])
    q = torch.tensor([0.40, 0.10, 0.25, 0.25, 0.00, 0.00])  # ids 4 and 5 are not draft tokens
    n = 200_000
    gen = torch.Generator().manual_seed(0)
    drafted = torch.multinomial(q, n, replacement=True, generator=gen)
    kept, replacement = accept_tokens(p.expand(n, -1), q.expand(n, -1), drafted, gen)
    result = torch.where(kept, drafted, replacement)
    empirical = torch.bincount(result, minlength=6).float() / n
    tolerance = 5 * (p * (1 - p) / n).sqrt()  # five standard errors
    assert bool(((empirical - p).abs() < tolerance).all()), (empirical, p)
    # Acceptance itself is what it should be: sum of min(p, q).
    assert float(kept.float().mean()) == pytest.approx(float(torch.minimum(p, q).sum()), abs=5 / math.sqrt(n))


def test_sampled_verify_keeps_what_agrees_and_replaces_the_first_rejection():
    gen = torch.Generator().manual_seed(0)
    same = torch.softmax(torch.randn(4, 8, generator=gen), -1)
    tokens = sampled_verify(same, same[:3], [1, 2, 3], gen)  # q == p: nothing is ever rejected
    assert tokens[:3] == [1, 2, 3] and len(tokens) == 4
    certain = torch.zeros(4, 8)
    certain[:, 6] = 1.0  # the target only ever says 6: guess 1 is rejected, and max(0, p - q) is all on 6
    assert sampled_verify(certain, same[:3], [1, 2, 3], gen) == [6]


def test_sampled_speculative_decoding_is_seeded(model):
    draft = draft_of(model)
    prompt = _prompts(1)[0]
    runs = [
        speculative_generate(model, draft, prompt, SamplingConfig(10, temperature=1.0, seed=s), STOPS, 3).tokens
        for s in (1, 1, 2)
    ]
    assert runs[0] == runs[1] != runs[2]
    assert all(0 <= t < len(tiny_tokenizer()) for t in runs[0])


# ---- loading and the tool ---------------------------------------------------------------------------------------


def _save_run_with_draft(run: Path, model: VLM, heldout: str) -> Path:
    config = Config(model=model.cfg, eagle3=Eagle3Config(draft=DraftShapeConfig(draft_vocab_size=DRAFT_VOCAB)))
    config.data.heldout_urls = heldout
    config_yaml = OmegaConf.to_yaml(OmegaConf.structured(config))
    return Checkpointer(run, CheckpointConfig(keep_last=0)).save(5, model, config_yaml, tiny_tokenizer())


def test_load_draft_reads_the_saved_draft_and_names_a_missing_one(model, tmp_path):
    shard = write_shard(tmp_path / "h.tar", ["a red square"], [])
    checkpoint = _save_run_with_draft(tmp_path / "run", model, shard)
    loaded = load_draft(tmp_path / "run", model)
    assert isinstance(loaded, Eagle3Draft) and loaded.target_layers == draft_of(model).target_layers
    for name, tensor in draft_of(model).state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert checkpoint.name == "step_00000005"
    with detached(model):
        save_run(tmp_path / "plain", model)
    with pytest.raises(FileNotFoundError, match="no draft.safetensors: train one with curriculum=eagle3"):
        load_draft(tmp_path / "plain", model)


def test_speculate_tool_prints_the_measurements(model, tmp_path, capsys):
    shard = write_shard(tmp_path / "h.tar", ["a red square", "two blue rings", "a cross"], [("x", [0, 0, 1, 1])])
    _save_run_with_draft(tmp_path / "run", model, shard)
    args = ["--draft-tokens", "3", "--num-prompts", "2", "--max-new-tokens", "6", "--json"]
    result = main([str(tmp_path / "run"), *args])
    printed = json.loads(capsys.readouterr().out)
    assert printed["acceptance_length"] == result["acceptance_length"]
    expected = {"acceptance_length", "accept_rate_per_position", "identical_to_greedy", "tokens_per_s", "speedup"}
    assert expected | {"draft_tokens", "prompts", "new_tokens", "temperature", "device", "seconds"} <= set(printed)
    assert printed["identical_to_greedy"] is True and printed["prompts"] == 2 and printed["draft_tokens"] == 3
    assert len(printed["accept_rate_per_position"]) == 3 and 1 <= printed["acceptance_length"] <= 4
    assert set(printed["tokens_per_s"]) == {"speculative", "target_only"} and printed["speedup"] > 0
    assert 0 < printed["new_tokens"] <= 12 and printed["device"] == "cpu"

    # An offline draft run saves the target's shape only: --target names the real one.
    other = copy.deepcopy(model)
    with torch.no_grad():
        for weight in other.llm.parameters():
            weight.add_(torch.randn_like(weight))
    _save_run_with_draft(tmp_path / "offline", other, shard)
    elsewhere = main([str(tmp_path / "offline"), "--target", str(tmp_path / "run"), *args])
    capsys.readouterr()
    assert elsewhere["acceptance_length"] == result["acceptance_length"] and elsewhere["identical_to_greedy"]

    sampled = main([str(tmp_path / "run"), *args[:-1], "--temperature", "1", "--seed", "3"])
    summary, _, rest = capsys.readouterr().out.partition("\n")  # without --json: a line for people, then the JSON
    assert summary.startswith("2 prompts, K=3: acceptance length") and json.loads(rest) == json.loads(dumps(sampled))
    assert sampled["identical_to_greedy"] is None and sampled["temperature"] == 1.0


def test_help_runs_as_a_script():
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "speculate.py"), "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "--draft-tokens" in result.stdout and "--num-prompts" in result.stdout
