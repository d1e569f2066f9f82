"""Phase 1: exact counts, equality with a brute-force reference, determinism, and bad input."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import saftune
import tiny
from saftune.sparse.select import per_tensor_budget, top_k

SCORES = ["grad", "fisher", "random", "magnitude", "bias"]


def _reference_scores(case, score, seed=0):
    """Scores computed the obvious way: autograd.grad per batch / per example, no hooks."""
    model = case.model
    model.eval()
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    if score == "magnitude":
        return {n: -p.detach().abs() for n, p in zip(names, params)}
    if score == "random":
        g = torch.Generator().manual_seed(seed)
        return {n: torch.rand(p.shape, generator=g) for n, p in zip(names, params)}
    total = [torch.zeros_like(p) for p in params]
    n_examples = 0
    for batch in case.batches:
        losses = case.loss_fn(model, batch)
        if score == "fisher":
            for i in range(losses.numel()):
                grads = torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True)
                total = [t + (g.square() if g is not None else 0) for t, g in zip(total, grads)]
        else:
            grads = torch.autograd.grad(losses.sum(), params, allow_unused=True)
            total = [t + (g if g is not None else 0) for t, g in zip(total, grads)]
        n_examples += losses.numel()
    scores = {n: t / n_examples for n, t in zip(names, total)}
    return scores if score == "fisher" else {n: s.abs() for n, s in scores.items()}


def _reference_mask(scores: dict, d: int) -> dict:
    """Concatenate, stable-sort descending (ties: lower global index first), keep d."""
    names = list(scores)
    flat = torch.cat([scores[n].reshape(-1) for n in names])
    order = torch.sort(-flat, stable=True).indices[:d]
    chosen = {}
    offset = 0
    for n in names:
        size = scores[n].numel()
        mine = order[(order >= offset) & (order < offset + size)] - offset
        if mine.numel():
            chosen[n] = torch.sort(mine).values
        offset += size
    return chosen


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("name", ["mlp", "mha", "bert"])
def test_mask_equals_brute_force_reference(name, score):
    case = tiny.BUILDERS[name]()
    sparsity = 0.3 if score == "bias" else 0.03
    mask = saftune.select_mask(case.model, case.loss_fn, case.batches, sparsity=sparsity, score=score, seed=7)
    scores = _reference_scores(tiny.BUILDERS[name](), "grad" if score == "bias" else score, seed=7)
    if score == "bias":
        scores = {n: s for n, s in scores.items() if n.rsplit(".", 1)[-1].endswith("bias")}
    d = int(sparsity * sum(s.numel() for s in scores.values()))
    assert mask.num_selected == d
    reference = _reference_mask(scores, d)
    assert mask.indices.keys() == reference.keys()
    for n in reference:
        assert torch.equal(mask.indices[n], reference[n]), n


@pytest.mark.parametrize("name", list(tiny.BUILDERS))
@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("budget", ["global", "per_tensor"])
def test_exact_count(name, score, budget):
    case = tiny.BUILDERS[name]()
    if score == "fisher" and name in ("clip", "t5"):
        case.batches = case.batches[:1]  # one backward per example: keep it quick
    sparsity = 0.1 if score == "bias" else 0.01
    if score == "bias" and name == "t5":  # T5 has no biases at all
        with pytest.raises(ValueError, match="needs parameters named"):
            saftune.select_mask(case.model, case.loss_fn, case.batches, sparsity=sparsity, score=score)
        return
    mask = saftune.select_mask(case.model, case.loss_fn, case.batches, sparsity=sparsity, score=score, budget=budget)
    candidates = [p for n, p in case.model.named_parameters() if score != "bias" or n.endswith("bias")]
    assert mask.num_candidates == sum(p.numel() for p in candidates)
    assert mask.num_selected == mask.num_candidates // (10 if score == "bias" else 100)
    for idx in mask.indices.values():
        assert torch.equal(idx, torch.unique(idx)) and idx.dtype == torch.int64


def test_grad_score_averages_over_examples_not_batches():
    case = tiny.mlp()  # batches of 16, 12 and 12 examples
    from saftune.sparse.scores import grad_scores

    params = dict(case.model.named_parameters())
    ours = grad_scores(case.model, params, case.loss_fn, case.batches, progress=False)
    x = torch.cat([b[0] for b in case.batches])
    y = torch.cat([b[1] for b in case.batches])
    full = torch.autograd.grad(case.loss_fn(case.model, (x, y)).mean(), list(params.values()))
    assert list(ours) == list(params)
    for s, g in zip(ours.values(), full):
        torch.testing.assert_close(s, g.abs(), atol=1e-6, rtol=1e-5)
    # The mean of batch means weighs the 12-example batches more: a different (wrong) score.
    first = list(params.values())[0]
    batch_means = [torch.autograd.grad(case.loss_fn(case.model, b).mean(), [first])[0] for b in case.batches]
    assert not torch.allclose((sum(batch_means) / 3).abs(), ours["0.weight"], atol=1e-6)


def test_per_tensor_budget_is_proportional():
    case = tiny.mlp()
    mask = saftune.select_mask(case.model, case.loss_fn, case.batches, sparsity=0.1, budget="per_tensor")
    sizes = [p.numel() for p in case.model.parameters()]
    expected = per_tensor_budget(sizes, int(0.1 * sum(sizes)))
    counts = [mask.counts.get(n, 0) for n, _ in case.model.named_parameters()]
    assert counts == expected
    assert per_tensor_budget([3, 3, 3], 2) == [1, 1, 0]  # equal remainders: earlier tensors first


def test_include_exclude_limit_the_candidates():
    case = tiny.clip()
    mask = saftune.select_mask(case.model, case.loss_fn, case.batches, sparsity=0.01, include=["text_model.*"],
                               exclude=["*layer_norm*"])
    expected = [p for n, p in case.model.named_parameters() if n.startswith("text_model.") and "layer_norm" not in n]
    assert mask.num_candidates == sum(p.numel() for p in expected)
    assert all(n.startswith("text_model.") and "layer_norm" not in n for n in mask.indices)


def test_ties_are_broken_by_lower_index():
    net = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        net.weight.fill_(0.5)
        net.weight[2, 3] = 0.1  # the smallest magnitude ranks first
    mask = saftune.select_mask(net, sparsity=5 / 16, score="magnitude")
    assert mask.indices["weight"].tolist() == [0, 1, 2, 3, 11]


def test_selection_is_deterministic_and_restores_the_model():
    case = tiny.bert()
    case.model.train()
    case.model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    a = saftune.select_mask(case.model, case.loss_fn, case.batches, sparsity=0.01)
    b = saftune.select_mask(case.model, case.loss_fn, case.batches, sparsity=0.01)
    assert a == b
    assert case.model.training
    assert not case.model.bert.embeddings.word_embeddings.weight.requires_grad
    assert all(p.grad is None for p in case.model.parameters())
    r1 = saftune.select_mask(case.model, sparsity=0.01, score="random", seed=1)
    r2 = saftune.select_mask(case.model, sparsity=0.01, score="random", seed=2)
    assert r1 == saftune.select_mask(case.model, sparsity=0.01, score="random", seed=1)
    assert r1.overlap(r2) < 0.2


def test_gradient_checkpointing_and_bf16_select_the_same_kind_of_mask():
    reference = saftune.select_mask(*_bert_with(lambda m: None), sparsity=0.01)
    checkpointed = saftune.select_mask(*_bert_with(_enable_checkpointing), sparsity=0.01)
    assert checkpointed == reference
    bf16 = saftune.select_mask(*_bert_with(lambda m: m.to(torch.bfloat16)), sparsity=0.01)
    assert bf16.num_selected == reference.num_selected
    assert bf16.overlap(reference) > 0.5  # bf16 gradients are noisier, but mostly agree


def _enable_checkpointing(model):
    # transformers 5 renamed gradient_checkpointing_enable; accept either
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing


def _bert_with(prepare):
    case = tiny.bert()
    prepare(case.model)
    return case.model, case.loss_fn, case.batches


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sparsity=0), r"sparsity must be in \(0, 1\]"),
        (dict(sparsity=1.5), r"sparsity must be in \(0, 1\]"),
        (dict(sparsity=1e-9), "selects floor"),
        (dict(sparsity=0.1, include=["encoder.*"]), "include pattern 'encoder.\\*' matches no parameter"),
        (dict(sparsity=0.1, exclude=["nothing*"]), "exclude pattern"),
        (dict(sparsity=0.1, score="gradient"), "unknown score 'gradient'; known scores: grad"),
        (dict(sparsity=0.1, budget="layer"), "budget must be"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(kwargs, message):
    case = tiny.mlp()
    with pytest.raises(ValueError, match=message):
        saftune.select_mask(case.model, case.loss_fn, case.batches, **kwargs)


def test_loss_fn_must_return_per_example_losses():
    case = tiny.mlp()
    with pytest.raises(ValueError, match=r"shape \[B\]"):
        saftune.select_mask(case.model, lambda m, b: case.loss_fn(m, b).mean(), case.batches, sparsity=0.1)
    with pytest.raises(ValueError, match="empty dataset"):
        saftune.select_mask(case.model, case.loss_fn, [], sparsity=0.1)
    with pytest.raises(ValueError, match="needs `loss_fn`"):
        saftune.select_mask(case.model, sparsity=0.1)


def test_nan_scores_name_the_parameter():
    case = tiny.mlp()
    with torch.no_grad():
        case.model[2].weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="'(0|2|4).weight'"):
        saftune.select_mask(case.model, case.loss_fn, case.batches, sparsity=0.1)


# -- the threshold search on its own ------------------------------------------------------------

def _brute_top_k(tensors, k):
    return _reference_mask({i: t for i, t in enumerate(tensors)}, k)


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 12), min_size=1, max_size=4),
    values=st.sampled_from(["normal", "few_distinct", "signed_zeros"]),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_top_k_matches_a_full_sort(sizes, values, seed, data):
    g = torch.Generator().manual_seed(seed)
    tensors = []
    for n in sizes:
        if values == "normal":
            t = torch.randn(n, generator=g)
        elif values == "few_distinct":
            t = torch.randint(-2, 3, (n,), generator=g).float()
        else:
            t = torch.where(torch.rand(n, generator=g) < 0.5, torch.tensor(-0.0), torch.tensor(0.0))
        tensors.append(t)
    total = sum(sizes)
    k = data.draw(st.integers(0, total))
    ours = top_k(tensors, k)
    reference = _brute_top_k(tensors, k)
    for i, idx in enumerate(ours):
        assert torch.equal(idx, reference.get(i, torch.empty(0, dtype=torch.int64))), (i, tensors, k)


# -- the selection rules of the newer sparse methods (GPS, FPS, LT-SFT, SIFT) ------------------------

def _reference_per_row(scores: dict, d: int, embeddings=()) -> dict:
    """GPS's budget the obvious way: raise a common level q until the next one would overshoot d, give the
    left-over entries to the rows whose next-best entry scores highest, and read each row's best entries
    off a full stable sort."""
    rows = []  # (name, row index, descending stable order of its entries as flat indices, their scores)
    for n, s in scores.items():
        if s.dim() < 2:
            grid = torch.arange(s.numel()).reshape(1, -1)
        elif n in embeddings:
            grid = torch.arange(s.numel()).reshape(s.shape[0], -1).T
        else:
            grid = torch.arange(s.numel()).reshape(s.shape[0], -1)
        flat = s.reshape(-1)
        for r in range(grid.shape[0]):
            order = torch.sort(-flat[grid[r]], stable=True).indices
            rows.append((n, r, grid[r][order], flat[grid[r]][order]))
    q = 0
    while sum(min(len(idx), q + 1) for _, _, idx, _ in rows) <= d and q < max(len(idx) for _, _, idx, _ in rows):
        q += 1
    left = d - sum(min(len(idx), q) for _, _, idx, _ in rows)
    open_rows = [i for i, (_, _, idx, _) in enumerate(rows) if len(idx) > q]
    by_next = sorted(open_rows, key=lambda i: (-float(rows[i][3][q]), i))[:left]
    chosen = {}
    for i, (n, _, idx, _) in enumerate(rows):
        take = min(len(idx), q) + (1 if i in by_next else 0)
        chosen.setdefault(n, []).extend(idx[:take].tolist())
    return {n: torch.tensor(sorted(v), dtype=torch.int64) for n, v in chosen.items() if v}


@pytest.mark.parametrize("sparsity", [0.003, 0.02, 0.3, 0.9])
@pytest.mark.parametrize("name", ["mlp", "bert"])
def test_per_row_budget_equals_brute_force_reference(name, sparsity):
    case = tiny.BUILDERS[name]()
    mask = saftune.select_mask(case.model, case.loss_fn, case.batches, sparsity=sparsity, budget="per_row")
    scores = _reference_scores(tiny.BUILDERS[name](), "grad")
    embeddings = {n for n, m in case.model.named_modules() if isinstance(m, nn.Embedding) for n in [f"{n}.weight"]}
    d = int(sparsity * sum(s.numel() for s in scores.values()))
    reference = _reference_per_row(scores, d, embeddings)
    assert mask.num_selected == d
    assert mask.indices.keys() == reference.keys()
    for n in reference:
        assert torch.equal(mask.indices[n], reference[n]), n


def test_per_row_budget_gives_every_output_unit_the_same_count():
    case = tiny.bert()
    names = dict(case.model.named_parameters())
    rows = sum(1 if p.dim() < 2 else p.shape[1] if "embeddings" in n and p.dim() == 2 else p.shape[0]
               for n, p in names.items())
    mask = saftune.select_mask(case.model, case.loss_fn, case.batches, sparsity=0.05, budget="per_row")
    q = mask.num_selected // rows  # every row here is longer than q + 1
    linear = mask.boolean("bert.encoder.layer.0.intermediate.dense.weight").sum(1)
    words = mask.boolean("bert.embeddings.word_embeddings.weight").sum(0)  # an embedding's units are its columns
    for counts in (linear, words):
        assert set(counts.tolist()) <= {q, q + 1}
    bias = mask.counts.get("bert.encoder.layer.0.intermediate.dense.bias", 0)
    assert bias in (q, q + 1)  # a 1-D tensor is one row


def test_per_row_select_remainder_goes_to_the_best_next_entries():
    from saftune.sparse.select import per_row_select

    scores = [torch.tensor([[9.0, 1.0], [8.0, 7.0], [6.0, 5.0]]), torch.tensor([4.0, 4.0, 4.0])]
    # four rows, d = 5: one entry each (level 1), the fifth to row [8, 7] whose next entry, 7, is best
    assert [t.tolist() for t in per_row_select(scores, 5)] == [[0, 2, 3, 4], [0]]
    # level 2 over the 2-long rows is 6 entries; the 3-long row takes two and the last one gets nothing more
    assert [t.tolist() for t in per_row_select(scores, 8)] == [[0, 1, 2, 3, 4, 5], [0, 1]]
    with pytest.raises(ValueError, match="outside"):
        per_row_select(scores, 10)


def test_fps_score_is_weight_times_mean_input_magnitude_without_backward():
    case = tiny.mlp()
    model = case.model
    from saftune.sparse.scores import fps_scores

    params = {n: p for n, p in model.named_parameters() if n.endswith("weight")}
    with torch.no_grad():
        x = torch.cat([b[0] for b in case.batches])
        h1 = torch.relu(model[0](x))
        h2 = torch.tanh(model[2](h1))
    grad_modes = []
    model[2].register_forward_pre_hook(lambda m, a: grad_modes.append(torch.is_grad_enabled()))
    ours = fps_scores(model, params, case.loss_fn, case.batches, progress=False)
    for name, inputs in (("0.weight", x), ("2.weight", h1), ("4.weight", h2)):
        expected = model.get_parameter(name).abs() * inputs.abs().mean(0)[None, :]
        torch.testing.assert_close(ours[name], expected, atol=1e-6, rtol=1e-5)
    assert grad_modes == [False, False, False]  # one forward per batch, none with autograd
    assert all(p.grad is None for p in model.parameters())


def test_fps_scores_embeddings_by_token_frequency_and_only_linear_and_embedding_weights():
    case = tiny.bert()
    mask = saftune.select_mask(case.model, case.loss_fn, case.batches, sparsity=0.01, score="fps")
    expected = [p for n, m in case.model.named_modules() for pn, p in m.named_parameters(recurse=False)
                if pn == "weight" and isinstance(m, (nn.Linear, nn.Embedding))]
    assert mask.num_candidates == sum(p.numel() for p in expected)
    assert all(n.endswith(".weight") and "LayerNorm" not in n for n in mask.indices)
    from saftune.sparse.scores import fps_scores

    words = "bert.embeddings.word_embeddings.weight"
    scores = fps_scores(case.model, {words: case.model.get_parameter(words)}, case.loss_fn, case.batches, progress=False)
    ids = torch.cat([b[0] for b in case.batches]).reshape(-1)
    frequency = torch.bincount(ids, minlength=50).float() / ids.numel()
    torch.testing.assert_close(scores[words], case.model.get_parameter(words).abs() * frequency[:, None])


def test_fps_refuses_multihead_attention_with_the_fix():
    case = tiny.mha()
    with pytest.raises(ValueError, match=r"F.linear.*exclude=\['attn\.\*'\]"):
        saftune.select_mask(case.model, case.loss_fn, case.batches, sparsity=0.05, score="fps")
    mask = saftune.select_mask(case.model, case.loss_fn, case.batches, sparsity=0.05, score="fps", exclude=["attn.*"])
    assert set(mask.shapes) == {"embed.weight", "head.weight"}
    with pytest.raises(ValueError, match="only the weights of nn.Linear and nn.Embedding"):
        saftune.select_mask(case.model, case.loss_fn, case.batches, sparsity=0.5, score="fps", include=["norm.*"])


def test_lt_sft_scores_the_change_of_a_short_fine_tuning_and_leaves_the_model_alone():
    import copy

    case = tiny.mlp()
    before = {n: p.detach().clone() for n, p in case.model.named_parameters()}
    mask = saftune.select_mask(case.model, case.loss_fn, case.batches, sparsity=0.05, score="lt-sft",
                               score_options={"steps": 5, "lr": 1e-2})
    assert all(torch.equal(p, before[n]) for n, p in case.model.named_parameters())  # training starts from theta_0
    reference = copy.deepcopy(tiny.mlp().model).eval()
    optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.0)
    for step in range(5):  # 3 batches, cycled
        case.loss_fn(reference, case.batches[step % 3]).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    scores = {n: (p.detach() - before[n]).abs() for n, p in reference.named_parameters()}
    expected = _reference_mask(scores, mask.num_selected)
    assert {n: mask.indices[n] for n in mask.indices}.keys() == expected.keys()
    for n in expected:
        assert torch.equal(mask.indices[n], expected[n]), n
    assert mask.meta["score_options"] == {"steps": 5, "lr": 1e-2}


def test_max_batches_scores_from_the_first_batches_only():
    case = tiny.mlp()
    sift = saftune.select_mask(case.model, case.loss_fn, case.batches, sparsity=0.05, budget="per_tensor", max_batches=1)
    first = saftune.select_mask(case.model, case.loss_fn, case.batches[:1], sparsity=0.05, budget="per_tensor")
    every = saftune.select_mask(case.model, case.loss_fn, case.batches, sparsity=0.05, budget="per_tensor")
    assert sift.indices.keys() == first.indices.keys()
    assert all(torch.equal(sift.indices[n], first.indices[n]) for n in first.indices)
    assert sift != every and sift.meta["max_batches"] == 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_batches=0), "max_batches must be a positive number"),
        (dict(score="lt-sft", score_options={"epochs": 1}), "score 'lt-sft' has no option 'epochs'; its options: steps, lr"),
        (dict(score="grad", score_options={"steps": 1}), "score 'grad' has no option 'steps'; its options: none"),
        (dict(score="lt-sft", score_options={"steps": 0}), "steps must be a positive integer"),
        (dict(budget="per_neuron"), "budget must be one of 'global', 'per_tensor', 'per_row'"),
    ],
)
def test_bad_selection_rule_options_are_refused(kwargs, message):
    case = tiny.mlp()
    with pytest.raises(ValueError, match=message):
        saftune.select_mask(case.model, case.loss_fn, case.batches, **{"sparsity": 0.1, **kwargs})


@pytest.mark.parametrize("name", list(tiny.BUILDERS))
@pytest.mark.parametrize("score, budget", [("grad", "per_row"), ("fps", "global"), ("fps", "per_row"),
                                           ("lt-sft", "per_tensor")])
def test_new_rules_select_exactly_d(name, score, budget):
    case = tiny.BUILDERS[name]()
    if score == "fps" and name in ("mha", "cnn"):
        pytest.skip("fps refuses nn.MultiheadAttention (tested above); the CNN's one Linear has 24 weights")
    options = {"steps": 2} if score == "lt-sft" else None
    mask = saftune.select_mask(case.model, case.loss_fn, case.batches, sparsity=0.01, score=score, budget=budget,
                               score_options=options)
    assert mask.num_selected == mask.num_candidates // 100
    for idx in mask.indices.values():
        assert torch.equal(idx, torch.unique(idx)) and idx.dtype == torch.int64


@settings(max_examples=60, deadline=None)
@given(shapes=st.lists(st.sampled_from([(3,), (1,), (2, 3), (4, 2), (3, 1, 2), (5,)]), min_size=1, max_size=4),
       embedding=st.booleans(), seed=st.integers(0, 2**16), data=st.data())
def test_per_row_select_matches_the_reference_with_ties(shapes, embedding, seed, data):
    from saftune.sparse.select import per_row_select

    g = torch.Generator().manual_seed(seed)
    scores = {f"t{i}": torch.randint(0, 3, shape, generator=g).float() for i, shape in enumerate(shapes)}
    columns = [embedding and i == 0 and len(shape) == 2 for i, shape in enumerate(shapes)]
    d = data.draw(st.integers(0, sum(s.numel() for s in scores.values())))
    ours = per_row_select(list(scores.values()), d, columns)
    reference = _reference_per_row(scores, d, {n for n, c in zip(scores, columns) if c})
    for name, idx in zip(scores, ours):
        assert torch.equal(idx, reference.get(name, torch.empty(0, dtype=torch.int64))), (name, scores, d)
