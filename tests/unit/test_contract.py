"""The request contract with the real SmolLM2 tokenizer: counts, budget, maxima, fields."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from models.config import StoreConfig
from models.store import ModelStore
from models.tokenizer import (
    PREFIX_CHARS_PER_TOKEN,
    TokenCounter,
    added_token_splitter,
    context_length,
)
from serving.core.contract import prepare_chat, prepare_completion, prepare_embeddings
from serving.errors import ContextLengthExceeded, InvalidRequest
from serving.limits.plan import reservation_size
from serving.protocol.requests import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from serving.settings import ContractConfig

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
QUESTION = {"role": "user", "content": "What is the capital of France?"}


def store_dir(entry: str) -> Path:
    """The real model files (``make test`` pulls them first)."""
    return ModelStore(StoreConfig().root).resolve(entry)


@pytest.fixture(scope="module")
def chat_counter() -> TokenCounter:
    return TokenCounter.from_dir(store_dir("smollm2-135m-instruct"), ["--max-model-len", "2048"])


@pytest.fixture(scope="module")
def embed_counter() -> TokenCounter:
    return TokenCounter.from_dir(store_dir("all-minilm-l6-v2"))


def chat(**fields: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "smollm2", "messages": [SYSTEM, QUESTION]} | fields
    )


def test_counts_match_what_vllm_reports(chat_counter: TokenCounter) -> None:
    # vLLM's usage.prompt_tokens for the same prompts (checked against the engine in
    # tests/integration/test_contract_engine.py).
    assert chat_counter.count_chat([SYSTEM, QUESTION]) == 27
    assert chat_counter.count_text("Paris is") == 2


def test_context_lengths_are_what_vllm_uses(embed_counter: TokenCounter) -> None:
    assert embed_counter.context == 256  # sentence-transformers max_seq_length
    assert context_length(store_dir("smollm2-135m-instruct"), []) == 8192
    assert context_length(store_dir("smollm2-135m-instruct"), ["--max-model-len=1024"]) == 1024


def test_absent_max_tokens_is_what_remains(chat_counter: TokenCounter) -> None:
    prepared = prepare_chat(chat(), chat_counter, ContractConfig())
    assert prepared.prompt_tokens == 27
    assert prepared.body["max_tokens"] == 2048 - 27
    assert prepared.max_tokens == 2048 - 27


def test_overflow_is_refused_with_both_numbers(chat_counter: TokenCounter) -> None:
    with pytest.raises(ContextLengthExceeded) as caught:
        prepare_chat(chat(max_tokens=2030), chat_counter, ContractConfig())
    message = caught.value.message
    assert "2048" in message
    assert "2057" in message
    assert "27 in the prompt" in message
    assert caught.value.param == "messages"


def test_long_prompt_alone_overflows(chat_counter: TokenCounter) -> None:
    long = {"role": "user", "content": "word " * 3000}
    with pytest.raises(ContextLengthExceeded, match="no room"):
        prepare_chat(chat(messages=[long]), chat_counter, ContractConfig())


def test_max_completion_tokens_counts_too(chat_counter: TokenCounter) -> None:
    prepared = prepare_chat(chat(max_completion_tokens=100), chat_counter, ContractConfig())
    assert prepared.max_tokens == 100
    assert "max_tokens" not in prepared.body


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 9}, "n"),
        ({"max_tokens": 9000}, "max_tokens"),
        ({"max_completion_tokens": 9000}, "max_completion_tokens"),
        ({"messages": [QUESTION] * 257}, "messages"),
    ],
)
def test_configured_maxima(
    chat_counter: TokenCounter, fields: dict[str, object], param: str
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        prepare_chat(chat(**fields), chat_counter, ContractConfig())
    assert caught.value.param == param


@pytest.mark.parametrize("temperature", [0, 0.0, 0.000009])
def test_n_over_one_with_greedy_sampling_is_refused_naming_n(temperature: float) -> None:
    """vLLM samples greedily below temperature 1e-5 and then refuses n > 1 (a 400 with
    param null); the gateway refuses it first, naming n, for chat and completions."""
    with pytest.raises(InvalidRequest, match="greedy sampling") as chat_refused:
        prepare_chat(chat(n=2, temperature=temperature), None, ContractConfig())
    completion = CompletionRequest(model="smollm2", prompt="hi", n=3, temperature=temperature)
    with pytest.raises(InvalidRequest, match="greedy sampling") as completion_refused:
        prepare_completion(completion, None, ContractConfig())
    for caught in (chat_refused, completion_refused):
        assert caught.value.param == "n"
        assert "n=1" in caught.value.message


@pytest.mark.parametrize(
    "fields",
    [
        {"n": 1, "temperature": 0},  # one greedy answer
        {"n": 2, "temperature": 0.00001},  # vLLM's threshold: sampled
        {"n": 2},  # no temperature: the model's default, sampled
        {"n": 2, "temperature": 0, "use_beam_search": True},  # beam search takes n
    ],
)
def test_n_with_sampling_or_beam_search_passes(fields: dict[str, Any]) -> None:
    prepared = prepare_chat(chat(**fields), None, ContractConfig())
    assert prepared.body["n"] == fields["n"]
    completion = CompletionRequest(model="smollm2", prompt="hi", **fields)
    assert prepare_completion(completion, None, ContractConfig()).body["n"] == fields["n"]


@pytest.mark.parametrize(
    ("given", "param"), [("", "input"), ([""], "input[0]"), (["a", "b", ""], "input[2]")]
)
def test_an_empty_string_to_embed_is_refused_naming_it(given: Any, param: str) -> None:
    """OpenAI: the input "cannot be an empty string" (vLLM embedded it)."""
    request = EmbeddingRequest(model="minilm", input=given)
    with pytest.raises(InvalidRequest, match="empty string") as caught:
        prepare_embeddings(request, None, ContractConfig())
    assert caught.value.param == param
    # text, token ids and a space are inputs
    for fine in ("a", ["a", " "], [1, 2], [[1], [2]]):
        prepare_embeddings(EmbeddingRequest(model="minilm", input=fine), None, ContractConfig())


def test_unknown_fields_are_logged_by_name_or_refused(
    chat_counter: TokenCounter, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="weir.contract"):
        prepared = prepare_chat(
            chat(frobnicate="secret value", top_k=5), chat_counter, ContractConfig()
        )
    assert prepared.body["frobnicate"] == "secret value"  # passed on
    assert "frobnicate" in caplog.text
    assert "secret value" not in caplog.text  # names only, never values
    assert "top_k" not in caplog.text  # a known vLLM extension
    with pytest.raises(InvalidRequest) as caught:
        prepare_chat(chat(frobnicate=1), chat_counter, ContractConfig(strict_fields=True))
    assert caught.value.param == "frobnicate"


def test_template_errors_are_client_errors(chat_counter: TokenCounter) -> None:
    strict = TokenCounter(
        chat_counter.tokenizer,
        context=100,
        chat_template=(
            "{% if messages[0].role != 'user' %}{{ raise_exception('user first') }}{% endif %}"
        ),
    )
    with pytest.raises(InvalidRequest, match="user first") as caught:
        prepare_chat(chat(), strict, ContractConfig())
    assert caught.value.param == "messages"
    # a null content is no template error: it renders as an empty message and counts as
    # one (the template's default system prompt and the empty user turn: 30 tokens). The
    # wire model refuses it for a user message (only an assistant's may be null), so the
    # counter is asked directly.
    counted = chat_counter.count_chat([{"role": "user", "content": None}])
    assert counted == chat_counter.count_chat([{"role": "user", "content": ""}]) == 30
    with pytest.raises(ValidationError, match="needs content"):
        chat(messages=[{"role": "user", "content": None}])


def test_completion_budget_uses_the_longest_prompt(chat_counter: TokenCounter) -> None:
    request = CompletionRequest(model="smollm2", prompt=["Paris is", "word " * 1000])
    prepared = prepare_completion(request, chat_counter, ContractConfig())
    longest = chat_counter.count_text("word " * 1000)
    assert prepared.body["max_tokens"] == 2048 - longest
    assert prepared.prompt_tokens == 2 + longest
    token_ids = CompletionRequest(model="smollm2", prompt=[1, 2, 3], max_tokens=2046)
    with pytest.raises(ContextLengthExceeded):
        prepare_completion(token_ids, chat_counter, ContractConfig())


def test_embedding_inputs(embed_counter: TokenCounter) -> None:
    prepared = prepare_embeddings(
        EmbeddingRequest(model="minilm", input=["a b", "hello world"]),
        embed_counter,
        ContractConfig(),
    )
    assert prepared.prompt_tokens == 8
    with pytest.raises(InvalidRequest) as caught:
        prepare_embeddings(
            EmbeddingRequest(model="minilm", input=["x"] * 300), embed_counter, ContractConfig()
        )
    assert caught.value.param == "input"
    with pytest.raises(ContextLengthExceeded, match="input 1"):
        prepare_embeddings(
            EmbeddingRequest(model="minilm", input=["ok", "word " * 300]),
            embed_counter,
            ContractConfig(),
        )


def test_without_a_counter_nothing_is_counted() -> None:
    prepared = prepare_chat(chat(max_tokens=5), None, ContractConfig())
    assert prepared.prompt_tokens is None
    assert prepared.max_tokens == 5


def test_every_prompt_of_a_list_is_reserved(chat_counter: TokenCounter) -> None:
    request = CompletionRequest(model="smollm2", prompt=["hi"] * 100, max_tokens=100, n=2)
    prepared = prepare_completion(request, chat_counter, ContractConfig())
    assert prepared.body["max_tokens"] == 100  # what the engine gets: per prompt
    assert prepared.prompt_tokens == sum(chat_counter.count_texts(["hi"] * 100))
    assert reservation_size(prepared.prompt_tokens, prepared.max_tokens, 2) == (
        prepared.prompt_tokens + 100 * 100 * 2
    )
    uncounted = prepare_completion(request, None, ContractConfig())
    assert uncounted.max_tokens == 100 * 100


class RecordedTokenizer:
    """The counter's real tokenizer, and the length of every text any of its encode
    methods (encode, encode_batch, encode_batch_fast) was given."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.texts: list[int] = []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.tokenizer, name)
        if not name.startswith("encode"):
            return method

        def encode(texts: str | list[str], *args: Any, **options: Any) -> Any:
            self.texts += [len(texts)] if isinstance(texts, str) else [len(t) for t in texts]
            return method(texts, *args, **options)

        return encode


@pytest.fixture
def tokenized(chat_counter: TokenCounter, monkeypatch: pytest.MonkeyPatch) -> RecordedTokenizer:
    recorded = RecordedTokenizer(chat_counter.tokenizer)
    monkeypatch.setattr(chat_counter, "tokenizer", recorded)
    return recorded


def test_prompts_too_long_to_fit_are_refused_before_counting(
    chat_counter: TokenCounter, tokenized: RecordedTokenizer
) -> None:
    assert chat_counter.max_chars is not None
    huge = "word " * 800_000
    with pytest.raises(ContextLengthExceeded, match="characters"):
        prepare_completion(
            CompletionRequest(model="smollm2", prompt=["Hi", huge]), chat_counter, ContractConfig()
        )
    with pytest.raises(ContextLengthExceeded, match="characters"):
        prepare_chat(
            chat(messages=[{"role": "user", "content": huge}]), chat_counter, ContractConfig()
        )
    assert tokenized.texts == []  # refused by length: the tokenizer never ran
    fits = CompletionRequest(model="smollm2", prompt="Hi")
    prepare_completion(fits, chat_counter, ContractConfig())
    assert tokenized.texts == [2]  # (what is recorded: a prompt that fits is counted)


def test_long_wordpiece_inputs_are_counted_by_prefix(
    embed_counter: TokenCounter, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert embed_counter.max_chars is None
    assert embed_counter.prefix_counts
    tokenized = RecordedTokenizer(embed_counter.tokenizer)
    monkeypatch.setattr(embed_counter, "tokenizer", tokenized)
    with pytest.raises(ContextLengthExceeded, match="input 0"):
        prepare_embeddings(
            EmbeddingRequest(model="minilm", input="word " * 800_000),
            embed_counter,
            ContractConfig(),
        )
    # only the first prefix was tokenized (it already has more tokens than the context),
    # never the 4,000,000 characters
    [prefix] = tokenized.texts
    assert prefix <= embed_counter.context * PREFIX_CHARS_PER_TOKEN
    fits = "word " * 250  # 2 + 250 tokens: exact; past the context, at least a prefix's
    short, long = embed_counter.count_texts([fits, fits * 3])
    assert short == 252
    assert embed_counter.context < long <= 752


SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<repo_name>", "<|im_start"]


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["system", "user", "assistant"]),
            st.lists(st.one_of(st.text(max_size=40), st.sampled_from(SPECIALS)), max_size=5),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_piecewise_counts_equal_whole_text_counts(
    chat_counter: TokenCounter, conversation: list[tuple[str, list[str]]]
) -> None:
    """Counted piece by piece between added tokens, with earlier pieces' counts reused,
    a prompt has exactly the tokens the tokenizer gives the whole text (vLLM's count)."""
    messages = [{"role": role, "content": "".join(parts)} for role, parts in conversation]
    text = chat_counter.render_chat(messages)
    whole = len(chat_counter.tokenizer.encode(text, add_special_tokens=False).ids)
    assert chat_counter.count_rendered(text) == whole
    assert chat_counter.count_rendered(text) == whole  # the second time from kept counts


def test_piecewise_counting_is_used_only_where_it_is_exact(
    chat_counter: TokenCounter, embed_counter: TokenCounter
) -> None:
    assert added_token_splitter(chat_counter.tokenizer) is not None  # byte-level BPE
    assert added_token_splitter(embed_counter.tokenizer) is None  # BERT's normalizer


def image(url: object) -> ChatCompletionRequest:
    part = {"type": "image_url", "image_url": {"url": url}}
    parts = [{"type": "text", "text": "This:"}, part]
    return chat(messages=[{"role": "user", "content": "Look."}, {"role": "user", "content": parts}])


@pytest.mark.parametrize(
    "url",
    ["http://169.254.169.254/latest/meta-data/", "https://internal.example/x.png",
     "file:///etc/passwd", "ftp://images.example/a.png", "HTTP://images.example.evil/a.png",
     "https://images.example@evil.example/a.png", 7],
)  # fmt: skip
def test_an_image_url_the_engine_would_fetch_is_refused_unless_its_host_is_allowed(
    url: object,
) -> None:
    config = ContractConfig(image_url_hosts=("images.example",))
    with pytest.raises(InvalidRequest) as refused:
        prepare_chat(image(url), None, config)
    assert refused.value.param == "messages[1].content[1].image_url.url"


@pytest.mark.parametrize(
    ("url", "hosts"),
    [("data:image/png;base64,iVBORw0KGgo=", ()), ("DATA:image/png;base64,AAAA", ()),
     ("https://images.example/a.png", ("images.example",)),
     ("http://IMAGES.example:8080/a.png", ("images.example",))],
)  # fmt: skip
def test_data_urls_and_allowed_hosts_pass(url: str, hosts: tuple[str, ...]) -> None:
    prepared = prepare_chat(image(url), None, ContractConfig(image_url_hosts=hosts))
    assert prepared.body["messages"][1]["content"][1]["image_url"]["url"] == url
