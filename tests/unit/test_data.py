"""Data preparation for every task and split strategy, and the error messages for bad data.

Tokenizers are the locally trained ones from ``finetune_trainer.tiny_models`` (nothing is downloaded).
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding, default_data_collator

from finetune_api.resolve import SpecError, resolve_spec
from finetune_api.spec import FineTuneJobSpec
from finetune_trainer.data import (
    FALLBACK_CHAT_TEMPLATE,
    DataError,
    load_rows,
    make_collator,
    prepare_data,
)
from finetune_trainer.splits import merge_rare, split_rows, stratified_split
from finetune_trainer.tiny_models import build_tokenizer

IGNORE = -100


@pytest.fixture(scope="module")
def gpt_tok() -> Any:
    return build_tokenizer("gpt2")  # byte-level BPE with a chat template, eos = <|endoftext|>


@pytest.fixture(scope="module")
def t5_tok() -> Any:
    return build_tokenizer("t5")  # unigram; appends </s> itself


@pytest.fixture(scope="module")
def bert_tok() -> Any:
    return build_tokenizer("bert")


def spec_for(task: str, train: Path | str, hyper: dict[str, Any] | None = None, **dataset: Any) -> FineTuneJobSpec:
    """The spec as the trainer gets it: resolved by finetune_api (every training default filled in)."""
    raw = FineTuneJobSpec.model_validate(
        {
            "model": {"uri": "file:///models/tiny"},
            "task": task,
            "dataset": {"train": str(train), **dataset},
            "hyperparameters": hyper or {},
            "output": {"uri": "file:///out"},
        }
    )
    return resolve_spec(raw).spec


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    import csv

    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


TOPICS = {
    "law": "the court judge law contract tenant landlord lease",
    "health": "the doctor patient pain fever drug dose sleep",
    "sport": "the team game win lose sport match score",
}


def topic_of(text: str) -> str:
    """The topic whose own words (not the shared "the") the text uses."""
    words = set(text.split())
    (topic,) = [t for t, vocab in TOPICS.items() if words & (set(vocab.split()) - {"the"})]
    return topic


def topic_rows(n_per_topic: int, label_of: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Texts from three vocabularies (so TF-IDF + KMeans finds three clusters), labelled by topic."""
    rows = []
    for t, words in TOPICS.items():
        w = words.split()
        for i in range(n_per_topic):
            text = " ".join(w[(i + k) % len(w)] for k in range(6)) + f" item{i}"
            rows.append({"text": text, "label": (label_of or {}).get(t, t), "topic": t})
    return rows


# ---- reading files -------------------------------------------------------------------------------------


def test_load_rows_every_format(tmp_path: Path) -> None:
    recs = [{"q": "a", "n": 1}, {"q": "b", "n": 2}]
    (tmp_path / "d.jsonl").write_text('{"q": "a", "n": 1}\n\n{"q": "b", "n": 2}\n')
    (tmp_path / "d.json").write_text(json.dumps(recs))
    (tmp_path / "w.json").write_text(json.dumps({"data": recs}))
    write_csv(tmp_path / "d.csv", ["q", "n"], [["a", 1], ["b", 2]])
    (tmp_path / "d.tsv").write_text("q\tn\na\t1\nb\t2\n")
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "d.parquet")
    with gzip.open(tmp_path / "g.jsonl.gz", "wt") as fh:
        fh.write('{"q": "a", "n": 1}\n{"q": "b", "n": 2}\n')
    for name in ("d.jsonl", "d.json", "w.json", "d.csv", "d.tsv", "d.parquet", "g.jsonl.gz"):
        assert load_rows(tmp_path / name, "auto") == recs, name
    (tmp_path / "lines.txt").write_text("first sample\n\n  \nsecond sample\n")
    assert load_rows(tmp_path / "lines.txt", "auto") == [{"text": "first sample"}, {"text": "second sample"}]
    (tmp_path / "data.dat").write_text('{"q": "a", "n": 1}\n')
    assert load_rows(tmp_path / "data.dat", "jsonl") == [{"q": "a", "n": 1}]  # explicit format wins


def test_csv_keeps_na_words_and_empty_cells_as_text(tmp_path: Path) -> None:
    write_csv(tmp_path / "d.csv", ["text", "label"], [["NA", "null"], ["", "x"]])
    assert load_rows(tmp_path / "d.csv", "auto") == [{"text": "NA", "label": "null"}, {"text": "", "label": "x"}]


def test_unsupported_extension_names_file_and_options(tmp_path: Path) -> None:
    (tmp_path / "train.xlsx").write_text("x")
    with pytest.raises(DataError) as exc:
        load_rows(tmp_path / "train.xlsx", "auto")
    msg = str(exc.value)
    assert "train.xlsx" in msg and "'.xlsx'" in msg and ".jsonl" in msg and "dataset.fileFormat" in msg


def test_malformed_jsonl_names_line_and_json_error(tmp_path: Path) -> None:
    (tmp_path / "train.jsonl").write_text('{"text": "ok"}\n\n{"text": "broken"\n{"text": "ok"}\n')
    with pytest.raises(DataError, match=r"train\.jsonl line 3: malformed JSON: Expecting ',' delimiter"):
        load_rows(tmp_path / "train.jsonl", "auto")
    (tmp_path / "list.jsonl").write_text('{"text": "ok"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"list\.jsonl line 2: expected a JSON object, got list"):
        load_rows(tmp_path / "list.jsonl", "auto")
    (tmp_path / "bytes.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match=r"bytes\.jsonl line 2: not valid UTF-8"):
        load_rows(tmp_path / "bytes.jsonl", "auto")
    (tmp_path / "obj.json").write_text('{"rows": []}')
    with pytest.raises(DataError, match=r"obj\.json: expected a JSON list of records"):
        load_rows(tmp_path / "obj.json", "auto")
    (tmp_path / "bad.json").write_text('[{"a": 1},\n {"a": }]')
    with pytest.raises(DataError, match=r"bad\.json line 2: malformed JSON"):
        load_rows(tmp_path / "bad.json", "auto")


# ---- causal-lm -----------------------------------------------------------------------------------------

LINES = [f"line {i} the cat sat on the mat and the dog ran in the park" for i in range(20)]


def test_packing_makes_blocks_of_exactly_block_size(tmp_path: Path, gpt_tok: Any) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(LINES) + "\n")
    spec = spec_for("causal-lm", path, {"blockSize": 16, "maxSeqLength": 64}, split={"validationRatio": 0.2})

    data = prepare_data(spec, gpt_tok, path, None)

    for ds in (data.train, data.eval):
        assert ds is not None and len(ds) > 0
        assert all(len(ids) == 16 for ids in ds["input_ids"])
        assert ds["labels"] == ds["input_ids"] and all(set(m) == {1} for m in ds["attention_mask"])
    # The blocks are the train lines' tokens, each followed by EOS, concatenated in file order.
    split = data.stats["train_rows"]
    assert split == 16 and data.stats["eval_rows"] == 4
    train_lines = [
        line for line in LINES if line not in {e["prompt"] + " " + e["reference"] for e in data.eval_examples}
    ]
    stream = [t for line in train_lines for t in gpt_tok(line)["input_ids"] + [gpt_tok.eos_token_id]]
    flat = [t for ids in data.train["input_ids"] for t in ids]
    assert flat == stream[: len(flat)] and len(stream) - len(flat) < 16
    assert data.stats["train_samples"] == len(stream) // 16
    assert make_collator(spec, gpt_tok) is default_data_collator  # equal-length blocks need no padding


def test_packing_of_data_shorter_than_a_block_keeps_one_block(tmp_path: Path, gpt_tok: Any) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "a tiny text"}])
    spec = spec_for("causal-lm", path, {"blockSize": 512}, split={"validationRatio": 0.0})
    data = prepare_data(spec, gpt_tok, path, None)
    assert len(data.train) == 1 and data.train["input_ids"][0][-1] == gpt_tok.eos_token_id
    assert data.eval is None and data.stats["short_block"] is True


def test_causal_without_packing_truncates_and_collator_pads_labels(tmp_path: Path, gpt_tok: Any) -> None:
    rows = [{"text": "short one"}, {"text": " ".join(["word"] * 100)}, {"text": "another short"}]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    spec = spec_for("causal-lm", path, {"packing": False, "maxSeqLength": 12}, split={"validationRatio": 0.0})

    data = prepare_data(spec, gpt_tok, path, None)

    lengths = [len(ids) for ids in data.train["input_ids"]]
    assert lengths[1] == 12 and lengths[0] < 12 and data.stats["truncated"] == 1
    assert data.train["input_ids"][0][-1] == gpt_tok.eos_token_id  # an untruncated sample ends with EOS
    collator = make_collator(spec, gpt_tok)
    assert isinstance(collator, DataCollatorForSeq2Seq)
    batch = collator([data.train[0], data.train[1]])
    assert batch["input_ids"].shape == (2, 12)
    assert batch["labels"][0, lengths[0] :].tolist() == [IGNORE] * (12 - lengths[0])  # padding is not learnt


def test_causal_template_and_eval_examples(tmp_path: Path, gpt_tok: Any) -> None:
    rows = [{"question": f"What is {i}?", "answer": f"It is {i}."} for i in range(10)]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    spec = spec_for(
        "causal-lm",
        path,
        {"packing": False},
        template={"prompt": "\nQuestion: {question}\nAnswer #1:", "response": " {answer}"},
        split={"validationRatio": 0.2, "seed": 1},
    )
    data = prepare_data(spec, gpt_tok, path, None)
    decoded = gpt_tok.decode(data.train["input_ids"][0])
    assert decoded.startswith("\nQuestion: What is") and "\nAnswer #1: It is" in decoded
    assert len(data.eval_examples) == 2
    for ex in data.eval_examples:
        i = ex["prompt"].split("What is ")[1].rstrip("?\nAnswer #1:")
        assert ex == {"prompt": f"\nQuestion: What is {i}?\nAnswer #1:", "reference": f" It is {i}."}


def test_causal_eval_examples_split_plain_text_in_half(tmp_path: Path, gpt_tok: Any) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "one two three"}] * 3)
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": "a b c d e f"}, {"text": "single"}])
    spec = spec_for("causal-lm", train, {"blockSize": 8}, validation=str(val))
    data = prepare_data(spec, gpt_tok, train, val)
    assert data.eval_examples == [{"prompt": "a b c", "reference": "d e f"}]  # one-word texts have no half


def test_missing_text_column_lists_columns(tmp_path: Path, gpt_tok: Any) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [{"body": "x", "url": "u"}])
    with pytest.raises(DataError) as exc:
        prepare_data(spec_for("causal-lm", path), gpt_tok, path, None)
    msg = str(exc.value)
    assert "train.jsonl" in msg and "column 'text'" in msg and "'body', 'url'" in msg and "dataset.fields" in msg


def test_row_missing_field_names_the_line(tmp_path: Path, gpt_tok: Any) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "fine"}, {"text": "fine"}, {"body": "no text here"}])
    with pytest.raises(DataError, match=r"train\.jsonl line 3, field 'text': missing; row has: 'body'"):
        prepare_data(spec_for("causal-lm", path), gpt_tok, path, None)


def test_empty_after_cleanup_names_file(tmp_path: Path, gpt_tok: Any) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "   "}, {"text": None}, {"text": "\n\t"}])
    with pytest.raises(DataError, match=r"train\.jsonl: no usable rows after cleanup \(3 rows read"):
        prepare_data(spec_for("causal-lm", path), gpt_tok, path, None)


def test_non_text_value_is_named(tmp_path: Path, gpt_tok: Any) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "ok"}, {"text": {"nested": 1}}])
    with pytest.raises(DataError, match=r"train\.jsonl line 2, field 'text': expected text, got dict"):
        prepare_data(spec_for("causal-lm", path), gpt_tok, path, None)


# ---- instruction (the medical Q&A workflow) ------------------------------------------------------------

QA_TEMPLATE = {"prompt": "### Question:\n{question}\n### Answer:\n", "response": "{answer}"}


def medical_rows(n: int) -> list[dict[str, Any]]:
    return [
        {
            "Description": f"Q.  Why   do I have\n pain number {i}?",
            "Patient": "patient text to drop",
            "Doctor": f"Hi. Rest and water, case {i}.",
        }
        for i in range(n)
    ]


def test_instruction_rename_drop_clean_first_n_template_and_masking(tmp_path: Path, gpt_tok: Any) -> None:
    path = write_jsonl(tmp_path / "medical.jsonl", medical_rows(12))
    spec = spec_for(
        "instruction",
        path,
        {"maxSeqLength": 128},
        rename={"Description": "question", "Doctor": "answer"},
        dropColumns=["Patient"],
        maxSamples=10,
        template=QA_TEMPLATE,
        split={"validationRatio": 0.2},
    )

    data = prepare_data(spec, gpt_tok, path, None)

    assert data.stats["train_rows_read"] == 12 and data.stats["train_rows_used"] == 10
    assert data.stats["train_rows"] + data.stats["eval_rows"] == 10
    for ids, labels in zip(data.train["input_ids"], data.train["labels"], strict=True):
        text = gpt_tok.decode(ids)
        i = text.split("pain number ")[1].split("?")[0]
        prompt = f"### Question:\nQ. Why do I have\npain number {i}?\n### Answer:\n"  # spaces collapsed
        assert text == prompt + f"Hi. Rest and water, case {i}." + gpt_tok.eos_token
        n_prompt = len(gpt_tok(prompt)["input_ids"])
        assert labels[:n_prompt] == [IGNORE] * n_prompt  # the prompt is masked ...
        assert labels[n_prompt:] == ids[n_prompt:] and ids[-1] == gpt_tok.eos_token_id  # ... the answer is not
    assert all(set(ex) == {"prompt", "reference"} for ex in data.eval_examples)
    assert data.eval_examples[0]["prompt"].startswith("### Question:\nQ. Why do I have\npain number")
    assert isinstance(make_collator(spec, gpt_tok), DataCollatorForSeq2Seq)


def test_rows_with_empty_template_fields_are_dropped_and_counted(tmp_path: Path, gpt_tok: Any) -> None:
    rows: list[dict[str, Any]] = [
        {"question": "Why?", "answer": "Because."},
        {"question": "How?", "answer": "  \n "},
        {"question": None, "answer": "x"},
    ]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    spec = spec_for("instruction", path, template=QA_TEMPLATE, split={"validationRatio": 0})
    data = prepare_data(spec, gpt_tok, path, None)
    assert len(data.train) == 1 and data.stats["train_rows_dropped_empty"] == 2


def test_clean_whitespace_off_keeps_text_as_is(tmp_path: Path, gpt_tok: Any) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "line one\n  line two", "answer": "ok"}])
    spec = spec_for("instruction", path, template=QA_TEMPLATE, cleanWhitespace=False, split={"validationRatio": 0})
    data = prepare_data(spec, gpt_tok, path, None)
    assert "line one\n  line two" in gpt_tok.decode(data.train["input_ids"][0])


def test_instruction_loss_on_everything_when_asked(tmp_path: Path, gpt_tok: Any) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "Why?", "answer": "Because."}])
    spec = spec_for(
        "instruction", path, template={**QA_TEMPLATE, "lossOnResponseOnly": False}, split={"validationRatio": 0}
    )
    data = prepare_data(spec, gpt_tok, path, None)
    assert data.train["labels"][0] == data.train["input_ids"][0]


def test_instruction_truncation_keeps_prompt_and_part_of_response(tmp_path: Path, gpt_tok: Any) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "Why?", "answer": " ".join(["because"] * 50)}])
    spec = spec_for("instruction", path, {"maxSeqLength": 40}, template=QA_TEMPLATE, split={"validationRatio": 0})
    data = prepare_data(spec, gpt_tok, path, None)
    ids, labels = data.train["input_ids"][0], data.train["labels"][0]
    n_prompt = len(gpt_tok("### Question:\nWhy?\n### Answer:\n")["input_ids"])
    assert len(ids) == 40 and data.stats["truncated"] == 1
    assert gpt_tok.decode(ids).startswith("### Question:\nWhy?\n### Answer:\nbecause")
    assert labels.count(IGNORE) == n_prompt and len(labels) - n_prompt > 0


def test_instruction_prompt_longer_than_max_names_the_row(tmp_path: Path, gpt_tok: Any) -> None:
    rows = [{"question": "short?", "answer": "ok"}] * 3 + [{"question": "why " * 40, "answer": "ok"}]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    spec = spec_for("instruction", path, {"maxSeqLength": 24}, template=QA_TEMPLATE)
    with pytest.raises(DataError) as exc:
        prepare_data(spec, gpt_tok, path, None)
    msg = str(exc.value)
    assert "qa.jsonl line 4" in msg and "prompt alone is" in msg and "maxSeqLength is 24" in msg


def test_instruction_needs_a_template(tmp_path: Path, gpt_tok: Any) -> None:
    """The rule lives in finetune_api.resolve: such a spec never reaches data preparation."""
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(SpecError, match=r"spec\.dataset\.template: instruction tasks need a template"):
        spec_for("instruction", path)


def test_template_with_unknown_field_lists_columns(tmp_path: Path, gpt_tok: Any) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    spec = spec_for("instruction", path, template={"prompt": "Q: {questoin}\nA: ", "response": "{answer}"})
    with pytest.raises(DataError) as exc:
        prepare_data(spec, gpt_tok, path, None)
    msg = str(exc.value)
    assert "qa.jsonl" in msg and "template.prompt uses field {questoin}" in msg and "'question', 'answer'" in msg


def test_template_field_missing_in_one_row_names_line(tmp_path: Path, gpt_tok: Any) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}, {"answer": "a2"}])
    spec = spec_for("instruction", path, template=QA_TEMPLATE)
    with pytest.raises(DataError, match=r"qa\.jsonl line 2, field 'question': dataset.template.prompt needs"):
        prepare_data(spec, gpt_tok, path, None)


def test_rename_of_absent_column_is_an_error(tmp_path: Path, gpt_tok: Any) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    spec = spec_for("instruction", path, template=QA_TEMPLATE, rename={"Descripton": "question"})
    with pytest.raises(DataError, match=r"qa\.jsonl: dataset.rename names column 'Descripton'.*'question', 'answer'"):
        prepare_data(spec, gpt_tok, path, None)
    spec = spec_for("instruction", path, template=QA_TEMPLATE, dropColumns=["url"])
    with pytest.raises(DataError, match=r"qa\.jsonl: dataset.dropColumns names column 'url'"):
        prepare_data(spec, gpt_tok, path, None)


# ---- chat ----------------------------------------------------------------------------------------------

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is rest?"},
    {"role": "assistant", "content": "Sleep and water."},
    {"role": "user", "content": "And pain?"},
    {"role": "assistant", "content": "See a doctor."},
]


def _learned_text(tok: Any, ids: list[int], labels: list[int]) -> str:
    return tok.decode([t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE])


def test_chat_learns_assistant_turns_only(tmp_path: Path, gpt_tok: Any) -> None:
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}] * 4)
    spec = spec_for("chat", path, split={"validationRatio": 0.25})

    data = prepare_data(spec, gpt_tok, path, None)

    ids, labels = data.train["input_ids"][0], data.train["labels"][0]
    assert gpt_tok.decode(ids) == gpt_tok.apply_chat_template(CONVERSATION, tokenize=False)
    eos, learned = gpt_tok.eos_token, _learned_text(gpt_tok, ids, labels)
    assert learned.startswith(f"Sleep and water.{eos}") and learned.rstrip().endswith(f"See a doctor.{eos}")
    for not_learned in ("Be brief", "What is rest", "And pain", "<|user|>", "<|assistant|>", "<|system|>"):
        assert not_learned not in learned
    assert data.eval_examples == [{"prompt_messages": CONVERSATION[:4], "reference": "See a doctor."}]


def test_chat_fallback_template_when_tokenizer_has_none(tmp_path: Path) -> None:
    tok = build_tokenizer("gpt2")
    tok.chat_template = None
    messages = [{"role": "user", "content": "hi   there"}, {"role": "assistant", "content": "hello"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    data = prepare_data(spec_for("chat", path, split={"validationRatio": 0}), tok, path, None)
    assert tok.chat_template == FALLBACK_CHAT_TEMPLATE  # kept, so generation uses the same format
    ids, labels = data.train["input_ids"][0], data.train["labels"][0]
    assert tok.decode(ids) == f"<|user|>\nhi there\n<|assistant|>\nhello{tok.eos_token}\n"
    assert _learned_text(tok, ids, labels) == f"hello{tok.eos_token}\n"


def test_chat_without_assistant_names_line_and_field(tmp_path: Path, gpt_tok: Any) -> None:
    rows = [{"messages": CONVERSATION}, {"messages": [{"role": "user", "content": "hello?"}]}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    with pytest.raises(DataError, match=r"chat\.jsonl line 2, field 'messages': no message with role 'assistant'"):
        prepare_data(spec_for("chat", path), gpt_tok, path, None)
    path = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user"}]}])
    with pytest.raises(DataError, match=r"bad\.jsonl line 1, field 'messages': message 1 must be an object"):
        prepare_data(spec_for("chat", path), gpt_tok, path, None)


def test_chat_reply_beyond_max_length_names_line(tmp_path: Path, gpt_tok: Any) -> None:
    long_user = {"role": "user", "content": "tell me " * 40}
    rows = [{"messages": [long_user, {"role": "assistant", "content": "ok"}]}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    spec = spec_for("chat", path, {"maxSeqLength": 16}, split={"validationRatio": 0})
    with pytest.raises(DataError, match=r"chat\.jsonl line 1, field 'messages': no assistant token fits"):
        prepare_data(spec, gpt_tok, path, None)


# ---- seq2seq (Flan-T5 QA) ------------------------------------------------------------------------------


def test_seq2seq_template_input_and_text_target_labels(tmp_path: Path, t5_tok: Any) -> None:
    rows = [{"question": f"what is {i}", "answer": f"it is {i}"} for i in range(5)]
    rows.append({"question": "why " * 60, "answer": "a longer answer to pad against"})
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    spec = spec_for(
        "seq2seq",
        path,
        {"maxSeqLength": 32},
        template={"prompt": "question: {question}"},
        fields={"target": "answer"},
        split={"validationRatio": 0},
    )

    data = prepare_data(spec, t5_tok, path, None)

    assert data.train["input_ids"][0] == t5_tok("question: what is 0")["input_ids"]
    assert data.train["labels"][0] == t5_tok(text_target="it is 0")["input_ids"]
    assert data.train["labels"][0][-1] == t5_tok.eos_token_id
    assert len(data.train["input_ids"][5]) == 32 and data.train["input_ids"][5][-1] == t5_tok.eos_token_id
    assert data.stats["truncated"] == 1
    short, long = len(data.train["labels"][0]), len(data.train["labels"][5])
    assert short < long
    batch = make_collator(spec, t5_tok)([data.train[0], data.train[5]])
    assert batch["labels"].shape == (2, long)
    assert batch["labels"][0, short:].tolist() == [IGNORE] * (long - short)  # label padding is never learnt


def test_seq2seq_default_fields_and_eval_examples(tmp_path: Path, t5_tok: Any) -> None:
    rows = [{"input": f"translate {i}", "target": f"out {i}"} for i in range(10)]
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    data = prepare_data(spec_for("seq2seq", path, split={"validationRatio": 0.3}), t5_tok, path, None)
    assert len(data.eval_examples) == 3
    for ex in data.eval_examples:
        assert ex["reference"] == ex["prompt"].replace("translate", "out")


# ---- classification ------------------------------------------------------------------------------------


def test_classification_string_labels_and_collator(tmp_path: Path, bert_tok: Any) -> None:
    path = write_csv(tmp_path / "train.csv", ["text", "label"], [[r["text"], r["label"]] for r in topic_rows(5)])
    spec = spec_for("classification", path, split={"validationRatio": 0.2, "strategy": "stratified"})

    data = prepare_data(spec, bert_tok, path, None)

    assert data.label_names == ["health", "law", "sport"]  # sorted distinct training labels
    assert data.stats["num_labels"] == 3
    assert sorted(set(data.train["labels"])) == [0, 1, 2]
    assert all(set(ex) == {"text", "label"} for ex in data.eval_examples)
    for ex in data.eval_examples:  # the label id maps back to the topic the text came from
        assert data.label_names[ex["label"]] == topic_of(ex["text"])
    assert isinstance(make_collator(spec, bert_tok), DataCollatorWithPadding)


def test_classification_declared_and_integer_labels(tmp_path: Path, bert_tok: Any) -> None:
    rows = [{"text": f"good movie {i}", "label": i % 2} for i in range(6)]
    path = write_jsonl(tmp_path / "ints.jsonl", rows)
    data = prepare_data(spec_for("classification", path, split={"validationRatio": 0}), bert_tok, path, None)
    assert data.label_names == ["0", "1"] and data.train["labels"] == [0, 1, 0, 1, 0, 1]

    rows = [{"review": f"film {i}", "sentiment": s} for i, s in enumerate(["pos", "neg", "pos"])]
    path = write_jsonl(tmp_path / "named.jsonl", rows)
    spec = spec_for(
        "classification",
        path,
        fields={"text": "review", "label": "sentiment"},
        labels=["pos", "neg"],
        split={"validationRatio": 0},
    )
    data = prepare_data(spec, bert_tok, path, None)
    assert data.label_names == ["pos", "neg"] and data.train["labels"] == [0, 1, 0]  # declared order


def test_numeric_string_labels_sort_numerically(tmp_path: Path, bert_tok: Any) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": f"t {i}", "label": str(i)} for i in (10, 2, 1)])
    data = prepare_data(spec_for("classification", path, split={"validationRatio": 0}), bert_tok, path, None)
    assert data.label_names == ["1", "2", "10"]


def test_validation_label_not_in_training_names_file_row_label(tmp_path: Path, bert_tok: Any) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}])
    write_csv(tmp_path / "val.csv", ["text", "label"], [["c", "pos"], ["d", "neutral"]])
    spec = spec_for("classification", train, validation=str(tmp_path / "val.csv"))
    with pytest.raises(DataError) as exc:
        prepare_data(spec, bert_tok, train, tmp_path / "val.csv")
    msg = str(exc.value)
    assert "val.csv row 2, field 'label'" in msg and "'neutral'" in msg and "not seen in the training data" in msg
    assert "neg, pos" in msg


def test_label_errors(tmp_path: Path, bert_tok: Any) -> None:
    path = write_jsonl(tmp_path / "nolabel.jsonl", [{"text": "a", "category": "x"}])
    with pytest.raises(DataError, match=r"nolabel\.jsonl: column 'label' \(dataset.fields.label\).*'text', 'category'"):
        prepare_data(spec_for("classification", path), bert_tok, path, None)
    path = write_jsonl(tmp_path / "mixed.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": 1}])
    with pytest.raises(DataError, match=r"mixed\.jsonl line 2, field 'label': label 1 mixes types"):
        prepare_data(spec_for("classification", path), bert_tok, path, None)
    path = write_jsonl(tmp_path / "undeclared.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}])
    spec = spec_for("classification", path, labels=["x", "z"])
    with pytest.raises(DataError, match=r"undeclared\.jsonl line 2, field 'label': label 'y' is not among dataset"):
        prepare_data(spec, bert_tok, path, None)


# ---- splits --------------------------------------------------------------------------------------------


def _eval_texts(data: Any) -> list[str]:
    return [e.get("text") or e["prompt"] + " " + e["reference"] for e in data.eval_examples]


@pytest.mark.parametrize("strategy", ["random", "tfidf-cluster"])
def test_same_seed_same_split_other_seed_other_split(tmp_path: Path, gpt_tok: Any, strategy: str) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": r["text"]} for r in topic_rows(10)])

    def run(seed: int) -> list[str]:
        split = {"validationRatio": 0.2, "strategy": strategy, "seed": seed, "clusters": 3}
        spec = spec_for("causal-lm", path, {"packing": False}, split=split)
        data = prepare_data(spec, gpt_tok, path, None)
        assert data.stats["train_rows"] == 24 and data.stats["eval_rows"] == 6
        return _eval_texts(data)

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_stratified_split_preserves_label_proportions_exactly() -> None:
    labels = ["a"] * 70 + ["b"] * 30
    train, val = split_rows("stratified", 0.2, 3, labels=labels)
    assert Counter(labels[i] for i in val) == {"a": 14, "b": 6}
    assert sorted(train + val) == list(range(100)) and not set(train) & set(val)
    assert train == sorted(train) and val == sorted(val)  # file order kept inside each part
    # Random splitting of the same data does not guarantee this (which is why stratified exists).
    assert any(Counter(labels[i] for i in split_rows("random", 0.2, s)[1]) != {"a": 14, "b": 6} for s in range(20))


def test_stratified_split_through_prepare_data(tmp_path: Path, bert_tok: Any) -> None:
    rows = [{"text": f"review {i}", "label": "pos" if i % 4 else "neg"} for i in range(40)]  # 30 pos, 10 neg
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    spec = spec_for("classification", path, split={"validationRatio": 0.2, "strategy": "stratified", "seed": 5})
    data = prepare_data(spec, bert_tok, path, None)
    names = data.label_names
    assert names is not None
    assert Counter(names[e["label"]] for e in data.eval_examples) == {"pos": 6, "neg": 2}
    assert data.stats["train_label_counts"] == {"neg": 8, "pos": 24}


def test_stratified_only_for_classification(tmp_path: Path, gpt_tok: Any) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": f"t {i}"} for i in range(10)])
    with pytest.raises(SpecError, match="stratified splits need class labels"):
        spec_for("causal-lm", path, split={"strategy": "stratified"})


def test_rare_strata_are_merged_not_refused() -> None:
    labels = ["a"] * 20 + ["b"] * 20 + ["c"]  # "c" has a single member
    merged = merge_rare(labels)
    assert merged[-1] == "*" and merged[:40] == labels[:40]
    train, val = split_rows("stratified", 0.25, 0, labels=labels)
    assert 40 in train + val and Counter(labels[i] for i in val)["a"] == 5 == Counter(labels[i] for i in val)["b"]
    # label x cluster: a rare combination falls back to its label's catch-all, keeping label proportions
    combined = [("a", 0)] * 10 + [("a", 1)] + [("b", 0)] * 10 + [("b", 1)]
    merged = merge_rare(combined, parent=[c[0] for c in combined])
    assert merged[:10] == combined[:10] and merged[10] == "*"  # ("*", "a") alone is still rare -> global
    combined = [("a", 0)] * 10 + [("a", 1), ("a", 2)] + [("b", 0)] * 10
    merged = merge_rare(combined, parent=[c[0] for c in combined])
    assert merged[10] == merged[11] == ("*", "a")  # two rare cells of label a pool into a's catch-all


def test_every_stratum_keeps_a_training_row() -> None:
    train, val = stratified_split(["x", "x", "y", "y", "y"], 0.6, 0)
    assert {"x", "y"} <= {["x", "x", "y", "y", "y"][i] for i in train} and len(val) >= 2


def test_tfidf_cluster_split_covers_every_topic(tmp_path: Path, gpt_tok: Any) -> None:
    rows = [{"text": r["text"]} for r in topic_rows(10)]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    split = {"validationRatio": 0.3, "strategy": "tfidf-cluster", "clusters": 3, "seed": 0}
    data = prepare_data(spec_for("causal-lm", path, {"packing": False}, split=split), gpt_tok, path, None)
    topics = Counter(topic_of(e["prompt"] + " " + e["reference"]) for e in data.eval_examples)
    assert topics == {"law": 3, "health": 3, "sport": 3}  # 30% of each cluster, not a random 9


def test_tfidf_cluster_classification_stratifies_label_x_cluster(tmp_path: Path, bert_tok: Any) -> None:
    # Two labels that cut across the three topics: 20 rows per topic, half "yes" half "no".
    rows = [{"text": r["text"], "label": "yes" if i % 2 else "no"} for i, r in enumerate(topic_rows(20))]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    split = {"validationRatio": 0.1, "strategy": "tfidf-cluster", "clusters": 3, "seed": 1}
    data = prepare_data(spec_for("classification", path, split=split), bert_tok, path, None)
    names = data.label_names
    assert names is not None
    cells = Counter((names[e["label"]], topic_of(e["text"])) for e in data.eval_examples)
    assert cells == {(lab, t): 1 for lab in ("yes", "no") for t in TOPICS}  # one from each label x topic cell


def test_validation_file_replaces_split_and_zero_ratio_means_no_eval(tmp_path: Path, gpt_tok: Any) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": f"train {i}"} for i in range(10)])
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": "held out text"}])
    spec = spec_for("causal-lm", train, {"packing": False}, validation=str(val))
    data = prepare_data(spec, gpt_tok, train, val)
    assert data.stats["train_rows"] == 10 and data.stats["eval_rows"] == 1 and "split" not in data.stats
    spec = spec_for("causal-lm", train, {"packing": False}, split={"validationRatio": 0})
    assert prepare_data(spec, gpt_tok, train, None).eval is None


def test_dataset_hash_tracks_file_content(tmp_path: Path, gpt_tok: Any) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "alpha beta"}] * 4)
    spec = spec_for("causal-lm", path, {"blockSize": 8})
    first = prepare_data(spec, gpt_tok, path, None).stats
    assert first["dataset_sha256"] == prepare_data(spec, gpt_tok, path, None).stats["dataset_sha256"]
    write_jsonl(path, [{"text": "alpha gamma"}] * 4)
    assert prepare_data(spec, gpt_tok, path, None).stats["dataset_sha256"] != first["dataset_sha256"]
    assert first["train_rows_read"] == 4 and first["train_tokens"] > 0


# ---- empty files and template safety --------------------------------------------------------------------------


def _empty_files(root: Path) -> dict[str, Path]:
    files = {name: root / name for name in ("zero.jsonl", "zero.csv", "zero.json", "zero.txt", "zero.parquet")}
    for path in files.values():
        path.write_bytes(b"")
    files["blank.jsonl"] = root / "blank.jsonl"
    files["blank.jsonl"].write_text("\n  \n\r\n")
    files["bom.json"] = root / "bom.json"
    files["bom.json"].write_bytes(b"\xef\xbb\xbf\n")
    files["list.json"] = root / "list.json"
    files["list.json"].write_text("[]")
    files["data.json"] = root / "data.json"
    files["data.json"].write_text('{"data": []}')
    files["header.csv"] = write_csv(root / "header.csv", ["text", "label"], [])
    files["rows.parquet"] = root / "rows.parquet"
    pq.write_table(pa.Table.from_pylist([], schema=pa.schema([("text", pa.string())])), files["rows.parquet"])
    files["zero.jsonl.gz"] = root / "zero.jsonl.gz"
    with gzip.open(files["zero.jsonl.gz"], "wb"):
        pass
    return files


def test_an_empty_dataset_file_is_refused_as_empty(tmp_path: Path, gpt_tok: Any) -> None:
    """The measured bug: an empty file was refused with a message about a missing template column."""
    for name, path in _empty_files(tmp_path).items():
        spec = spec_for("instruction", f"s3://data/{name}", template=QA_TEMPLATE)
        with pytest.raises(DataError) as exc:
            prepare_data(spec, gpt_tok, path, None)
        msg = str(exc.value)
        assert msg.startswith(f"s3://data/{name}: the file is empty"), (name, msg)
        assert "column" not in msg and "template" not in msg, (name, msg)


def test_an_empty_validation_file_is_refused_as_empty(tmp_path: Path, gpt_tok: Any) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "one sample"}, {"text": "two samples"}])
    (tmp_path / "val.jsonl").write_text("")
    spec = spec_for("causal-lm", train, validation="s3://data/val.jsonl")
    with pytest.raises(DataError, match=r"^s3://data/val\.jsonl: the file is empty \(0 bytes\)"):
        prepare_data(spec, gpt_tok, train, tmp_path / "val.jsonl")


@pytest.mark.parametrize(
    "placeholder",
    ["{question.__class__.__mro__}", "{question.__class__}", "{0}", "{}", "{question[0]}", "{question!r}"],
)
def test_the_trainer_never_formats_attribute_or_index_access(tmp_path: Path, gpt_tok: Any, placeholder: str) -> None:
    """Even when validation was bypassed (a hand-written job file), a template only ever inserts row values."""
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    spec = spec_for("instruction", path, template=QA_TEMPLATE)
    assert spec.dataset.template is not None
    bad = spec.dataset.template.model_copy(update={"prompt": f"Q: {placeholder} {{question}}\nA: "})
    spec = spec.model_copy(update={"dataset": spec.dataset.model_copy(update={"template": bad})})
    with pytest.raises(DataError) as exc:
        prepare_data(spec, gpt_tok, path, None)
    msg = str(exc.value)
    assert "dataset.template.prompt" in msg and placeholder in msg and "not a plain column name" in msg
    assert "<class" not in msg


def test_template_filling_is_plain_substitution() -> None:
    from finetune_trainer.formats import fill_template, template_fields

    row = {"q": "What is {x}?", "n": 3, "none": None}
    assert fill_template("{{q}}: {q} #{n} {none}", row) == "{q}: What is {x}? #3 None"  # values are never re-parsed
    assert template_fields("{q} {n} {q}") == ("q", "n")
    with pytest.raises(KeyError):
        fill_template("{missing}", row)
    for bad in ("{q.upper}", "{q[0]}", "{0}", "{q:>9}", "{q!a}", "{q"):
        with pytest.raises(ValueError):
            fill_template(bad, row)
