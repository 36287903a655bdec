"""Pooling models: embed / encode / score with vLLM's offline API.

The real all-MiniLM-L6-v2 (a sentence-transformers directory, fetched from PyPI) is
checked against HF transformers + mean pooling + L2 normalization, eager and compiled;
a tiny random BertModel checks every pooling type against HF to 1e-5 in fp32.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

from fxllm import LLM, EmbeddingRequestOutput, PoolingRequestOutput, ScoringRequestOutput, default_embedding_model
from fxllm.config import CompilationLevel, PoolerConfig
from fxllm.sampling_params import BeamSearchParams
from tests.tiny_models import VOCAB_SIZE, save_random_checkpoint, save_tiny_model

# Different lengths, so the flattened batch mixes short and long prompts.
SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground, while a crowd watches from the stands.",
    "Compilers split the captured graph at every attention op and compile each piece with Inductor, "
    "which keeps the number of distinct kernels small even for deep models.",
    "Hi",
]
MINILM_HIDDEN = 384
MINILM_LAYERS = 6
MINILM_MAX_SEQ_LENGTH = 256  # sentence_bert_config.json
MIN_COSINE = 0.9999

TINY_MAX_MODEL_LEN = 32  # also the token budget: prompts below need several forwards
TINY_PROMPT_LENGTHS = [5, 17, 32, 1, 9, 30]
TOLERANCE = 1e-5


# ---- the real model -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    return Path(default_embedding_model())


@pytest.fixture(scope="module")
def eager_minilm(minilm_dir: Path) -> LLM:
    return LLM(model=str(minilm_dir), enforce_eager=True)


@pytest.fixture(scope="module")
def compiled_minilm(minilm_dir: Path) -> LLM:
    return LLM(model=str(minilm_dir))


@pytest.fixture(scope="module")
def minilm_reference(minilm_dir: Path) -> list[torch.Tensor]:
    """sentence-transformers' recipe in HF: BertModel, attention-masked mean, L2 norm; one sentence at a time."""
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    model = BertModel.from_pretrained(minilm_dir, dtype=torch.float32).eval()
    vectors = []
    for sentence in SENTENCES:
        inputs = tokenizer(sentence, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**inputs).last_hidden_state[0]  # [tokens, hidden]
        mask = inputs["attention_mask"][0, :, None].float()
        vectors.append(F.normalize((hidden * mask).sum(0) / mask.sum(), dim=0))
    return vectors


@pytest.mark.parametrize("engine", ["eager_minilm", "compiled_minilm"])
def test_minilm_embeddings_match_hf_mean_pooling(engine: str, minilm_reference, request) -> None:
    llm: LLM = request.getfixturevalue(engine)
    tokenizer = llm.get_tokenizer()
    # Strings, a TextPrompt and a TokensPrompt, as generate() takes them.
    prompts = [*SENTENCES[:-2], {"prompt": SENTENCES[-2]}, {"prompt_token_ids": tokenizer.encode(SENTENCES[-1])}]
    outputs = llm.embed(prompts, use_tqdm=False)

    assert all(isinstance(output, EmbeddingRequestOutput) for output in outputs)
    assert len({output.request_id for output in outputs}) == len(SENTENCES)
    for sentence, output, reference in zip(SENTENCES, outputs, minilm_reference):
        assert output.prompt_token_ids == tokenizer.encode(sentence)
        embedding = torch.tensor(output.outputs.embedding)
        assert embedding.shape == (MINILM_HIDDEN,)
        assert F.cosine_similarity(embedding, reference, dim=0) >= MIN_COSINE, sentence
        assert embedding.norm() == pytest.approx(1.0, abs=TOLERANCE)  # modules.json lists Normalize


def test_minilm_compiles_piecewise_at_the_default_level(compiled_minilm: LLM) -> None:
    report = compiled_minilm.compile_report()
    assert report.level == CompilationLevel.PIECEWISE
    assert report.pieces == 2 * MINILM_LAYERS + 1  # split at each layer's attention op
    assert report.inductor_compiles > 0 or report.loaded_from_cache


def test_minilm_config_comes_from_its_sentence_transformers_files(eager_minilm: LLM) -> None:
    model_config = eager_minilm.llm_engine_config.model
    assert model_config.runner_type == "pooling"
    assert model_config.pooler_config == PoolerConfig(pooling_type="MEAN", normalize=True)
    assert model_config.max_model_len == MINILM_MAX_SEQ_LENGTH


def test_score_ranks_the_relevant_sentence_first_and_is_the_cosine(eager_minilm: LLM) -> None:
    query, relevant, unrelated = "A man is eating food.", "A man is eating a piece of bread.", "The stock market fell today."
    scores = eager_minilm.score(query, [relevant, unrelated], use_tqdm=False)  # 1:N

    assert len(scores) == 2 and all(isinstance(s, ScoringRequestOutput) for s in scores)
    assert scores[0].outputs.score > scores[1].outputs.score
    embeddings = [torch.tensor(o.outputs.embedding) for o in eager_minilm.embed([query, relevant, unrelated], use_tqdm=False)]
    for score, document in zip(scores, embeddings[1:]):
        assert score.outputs.score == pytest.approx(F.cosine_similarity(embeddings[0], document, dim=0).item(), abs=TOLERANCE)
    tokenizer = eager_minilm.get_tokenizer()
    assert scores[0].prompt_token_ids == tokenizer.encode(query) + tokenizer.encode(relevant)


def test_score_pairs_n_to_n_and_rejects_unequal_lists(eager_minilm: LLM) -> None:
    queries, documents = SENTENCES[:3], SENTENCES[3:6]
    pairwise = eager_minilm.score(queries, documents, use_tqdm=False)
    assert len(pairwise) == 3
    for query, document, scored in zip(queries, documents, pairwise):
        alone = eager_minilm.score(query, document, use_tqdm=False)  # 1:1
        assert len(alone) == 1 and scored.outputs.score == pytest.approx(alone[0].outputs.score, abs=TOLERANCE)
    with pytest.raises(ValueError, match="1:1, 1:N or N:N, got 2 and 3"):
        eager_minilm.score(SENTENCES[:2], SENTENCES[:3], use_tqdm=False)


def test_minilm_rejects_a_prompt_over_max_seq_length(eager_minilm: LLM) -> None:
    with pytest.raises(ValueError, match=f"prompt 1 has \\d+ tokens but max_model_len is {MINILM_MAX_SEQ_LENGTH}"):
        eager_minilm.embed(["short", "word " * MINILM_MAX_SEQ_LENGTH], use_tqdm=False)


# ---- a tiny random BertModel --------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory) -> Path:
    config = BertConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        architectures=["BertModel"],
    )
    torch.manual_seed(0)
    return save_random_checkpoint(BertModel(config), tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="module")
def tiny_prompts() -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    return [{"prompt_token_ids": torch.randint(VOCAB_SIZE, (n,), generator=generator).tolist()} for n in TINY_PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def tiny_hidden_states(tiny_bert_dir: Path, tiny_prompts) -> list[torch.Tensor]:
    """HF's last hidden states [tokens, hidden] of each prompt, run alone."""
    model = BertModel.from_pretrained(tiny_bert_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(torch.tensor([p["prompt_token_ids"]])).last_hidden_state[0] for p in tiny_prompts]


def _tiny_bert(model_dir: Path, **kwargs) -> LLM:
    return LLM(
        model=str(model_dir), enforce_eager=True, max_model_len=TINY_MAX_MODEL_LEN,
        max_num_batched_tokens=TINY_MAX_MODEL_LEN, **kwargs,
    )


@pytest.fixture(scope="module")
def tiny_bert(tiny_bert_dir: Path) -> LLM:
    return _tiny_bert(tiny_bert_dir)


def _hf_pooled(hidden: torch.Tensor, pooling_type: str, normalize: bool) -> torch.Tensor:
    pooled = {"MEAN": hidden.mean(0), "CLS": hidden[0], "LAST": hidden[-1]}[pooling_type]
    return F.normalize(pooled, dim=0) if normalize else pooled


@pytest.mark.parametrize(
    "override, expected",
    [
        (None, PoolerConfig("CLS", True)),  # vLLM's default for BERT without sentence-transformers files
        ({"pooling_type": "MEAN"}, PoolerConfig("MEAN", True)),
        (PoolerConfig(pooling_type="MEAN", normalize=False), PoolerConfig("MEAN", False)),
        ({"pooling_type": "cls", "normalize": False}, PoolerConfig("CLS", False)),
        (PoolerConfig(pooling_type="LAST"), PoolerConfig("LAST", True)),
        ({"pooling_type": "LAST", "normalize": False}, PoolerConfig("LAST", False)),
    ],
)
def test_tiny_bert_pools_as_hf(tiny_bert_dir, tiny_prompts, tiny_hidden_states, override, expected) -> None:
    llm = _tiny_bert(tiny_bert_dir, override_pooler_config=override)
    assert llm.llm_engine_config.model.pooler_config == expected
    outputs = llm.encode(tiny_prompts, pooling_task="embed", use_tqdm=False)  # several forwards: budget = 32 tokens

    assert all(isinstance(output, PoolingRequestOutput) for output in outputs)
    for output, hidden in zip(outputs, tiny_hidden_states):
        reference = _hf_pooled(hidden, expected.pooling_type, expected.normalize)
        torch.testing.assert_close(output.outputs.data, reference, atol=TOLERANCE, rtol=0)


def test_batches_split_whole_prompts_within_the_token_budget(tiny_bert: LLM) -> None:
    batches = tiny_bert.llm_engine.runner.plan_batches(TINY_PROMPT_LENGTHS)
    assert [list(b) for b in batches] == [[0, 1], [2], [3, 4], [5]]


def test_encode_without_a_task_embeds_and_warns(tiny_bert: LLM, tiny_prompts) -> None:
    with pytest.warns(UserWarning, match="pooling_task"):
        encoded = tiny_bert.encode(tiny_prompts[0], use_tqdm=False)
    embedded = tiny_bert.embed(tiny_prompts[0], use_tqdm=False)
    assert encoded[0].outputs.data.tolist() == embedded[0].outputs.embedding
    with pytest.raises(ValueError, match="pooling_task='classify' is not supported"):
        tiny_bert.encode(tiny_prompts[0], pooling_task="classify", use_tqdm=False)


def test_too_long_prompt_is_rejected_and_the_engine_keeps_serving(tiny_bert: LLM, tiny_prompts) -> None:
    before = tiny_bert.embed(tiny_prompts, use_tqdm=False)
    too_long = {"prompt_token_ids": [3] * (TINY_MAX_MODEL_LEN + 1)}
    with pytest.raises(ValueError, match=f"prompt 1 has {TINY_MAX_MODEL_LEN + 1} tokens but max_model_len is {TINY_MAX_MODEL_LEN}"):
        tiny_bert.embed([tiny_prompts[0], too_long], use_tqdm=False)
    after = tiny_bert.embed(tiny_prompts, use_tqdm=False)
    assert [o.outputs.embedding for o in after] == [o.outputs.embedding for o in before]


def test_generative_methods_on_a_pooling_model_say_what_it_supports(tiny_bert: LLM) -> None:
    supported = r"embed\(\), encode\(\) and score\(\)"
    with pytest.raises(ValueError, match=rf"LLM.generate\(\) needs a generative model.*{supported}"):
        tiny_bert.generate("hello", use_tqdm=False)
    with pytest.raises(ValueError, match=rf"LLM.chat\(\).*{supported}"):
        tiny_bert.chat([{"role": "user", "content": "hello"}], use_tqdm=False)
    with pytest.raises(ValueError, match=rf"LLM.beam_search\(\).*{supported}"):
        tiny_bert.beam_search(["hello"], BeamSearchParams(beam_width=2, max_tokens=2))


def test_bert_cannot_be_forced_to_generate(tiny_bert_dir: Path) -> None:
    with pytest.raises(ValueError, match="BertModel is an encoder without an LM head"):
        LLM(model=str(tiny_bert_dir), runner="generate", enforce_eager=True)


def test_sentence_transformers_files_set_pooling_normalization_and_length(tiny_bert_dir: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "st_bert"
    shutil.copytree(tiny_bert_dir, model_dir)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]  # no Normalize module
    (model_dir / "modules.json").write_text(json.dumps(modules))
    (model_dir / "1_Pooling").mkdir()
    (model_dir / "1_Pooling" / "config.json").write_text(
        json.dumps({"pooling_mode_cls_token": False, "pooling_mode_mean_tokens": False, "pooling_mode_lasttoken": True})
    )
    (model_dir / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 16}))

    model_config = LLM(model=str(model_dir), enforce_eager=True).llm_engine_config.model
    assert model_config.pooler_config == PoolerConfig("LAST", False)
    assert model_config.max_model_len == 16
    with pytest.raises(ValueError, match="larger than the model's maximum length 16 .sentence_bert_config.json."):
        LLM(model=str(model_dir), enforce_eager=True, max_model_len=32)


# ---- a generative model ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return save_tiny_model("llama", tmp_path_factory.mktemp("tiny_llama"))


def test_pooling_methods_on_a_generative_model_say_what_it_supports(tiny_llama_dir: Path) -> None:
    llm = LLM(model=str(tiny_llama_dir), enforce_eager=True, max_model_len=TINY_MAX_MODEL_LEN)
    supported = r"generate\(\), chat\(\) and beam_search\(\)"
    with pytest.raises(ValueError, match=rf"LLM.embed\(\) needs a pooling model.*{supported}.*runner='pooling'"):
        llm.embed("hello", use_tqdm=False)
    with pytest.raises(ValueError, match=rf"LLM.encode\(\).*{supported}"):
        llm.encode("hello", pooling_task="embed", use_tqdm=False)
    with pytest.raises(ValueError, match=rf"LLM.score\(\).*{supported}"):
        llm.score("hello", "world", use_tqdm=False)


@pytest.mark.parametrize("how", [{"runner": "pooling"}, {"task": "embed"}])
def test_runner_pooling_makes_a_decoder_embed_its_last_token(tiny_llama_dir: Path, tiny_prompts, how) -> None:
    llm = LLM(model=str(tiny_llama_dir), enforce_eager=True, max_model_len=TINY_MAX_MODEL_LEN, **how)
    assert llm.llm_engine_config.model.pooler_config == PoolerConfig("LAST", True)  # vLLM's decoder default
    outputs = llm.embed(tiny_prompts, use_tqdm=False)

    hf = AutoModel.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()  # the decoder without its LM head
    for prompt, output in zip(tiny_prompts, outputs):
        with torch.no_grad():
            hidden = hf(torch.tensor([prompt["prompt_token_ids"]])).last_hidden_state[0]
        torch.testing.assert_close(torch.tensor(output.outputs.embedding), _hf_pooled(hidden, "LAST", True), atol=TOLERANCE, rtol=0)


def test_the_graph_of_a_pooling_model_exports_like_a_generative_one(compiled_minilm, tmp_path):
    from fxllm.inspection import export_graph

    written = export_graph(compiled_minilm, tmp_path)
    assert written["pieces"] == compiled_minilm.compile_report().pieces
    assert Path(written["svg"]).read_text().startswith("<svg")
