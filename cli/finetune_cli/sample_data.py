"""Small synthetic datasets in the style of each seed workflow, for the demo and the end-to-end tests.

They are generated (no downloads) and have learnable structure, so a tiny model's loss visibly falls and
its metrics mean something. `write_all(dir)` writes every file the examples/ jobs name under `data/`.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Any

DISEASES = {
    "flu": ("fever", "cough"),
    "migraine": ("headache", "nausea"),
    "asthma": ("wheezing", "breathlessness"),
    "diabetes": ("thirst", "fatigue"),
    "anemia": ("weakness", "pale skin"),
    "allergy": ("sneezing", "itchy eyes"),
    "gastritis": ("stomach pain", "bloating"),
    "bronchitis": ("cough", "chest discomfort"),
}
COUNTRIES = {
    "France": "Paris",
    "Spain": "Madrid",
    "Italy": "Rome",
    "Germany": "Berlin",
    "Japan": "Tokyo",
    "Canada": "Ottawa",
    "Egypt": "Cairo",
    "Peru": "Lima",
    "Kenya": "Nairobi",
    "Norway": "Oslo",
}
LEGAL_TOPICS = ["deposit", "eviction", "contract", "wages", "custody", "parking ticket", "noise", "refund"]
ARGUMENTS = {
    "remorse": ["I deeply regret what I did", "I am truly sorry for my actions", "I apologize to the victims"],
    "family": ["my children depend on me", "I care for my elderly mother", "my family needs my support"],
    "health": ["I suffer from a chronic illness", "my medical condition is serious", "I need ongoing treatment"],
}


def medical_qa(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Instruction data with the seed's column names (input/output) and messy whitespace to clean."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        disease, (a, b) = rng.choice(sorted(DISEASES.items()))
        rows.append(
            {
                "input": f"  What are the symptoms of {disease}?  ",
                "output": f"The symptoms of {disease} are {a} and {b}.",
                "source": "synthetic",
            }
        )
    return rows


def legal_advice(n: int, seed: int = 1) -> list[dict[str, Any]]:
    """Causal-LM posts with the extra columns the BLOOM seed drops."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = rng.choice(LEGAL_TOPICS)
        rows.append(
            {
                "text": f"Question: my landlord has a problem with my {topic}. What can I do? "
                f"Answer #1: keep records about the {topic} and write to your landlord about the {topic}.",
                "created_timestamp": f"2020-01-{1 + i % 28:02d}",
                "downloaded_timestamp": "2022-06-01",
                "url": f"https://example.invalid/post/{i}",
            }
        )
    return rows


def text_lines(n: int, seed: int = 2) -> list[str]:
    rng = random.Random(seed)
    return [
        f"I would like to visit {c} and see {capital}."
        for c, capital in (rng.choice(sorted(COUNTRIES.items())) for _ in range(n))
    ]


def letters(n: int, seed: int = 3) -> list[dict[str, Any]]:
    """Classification: a defendant's letter and the argument it makes."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(sorted(ARGUMENTS))
        rows.append({"text": f"Your honor, {rng.choice(ARGUMENTS[label])}. Please consider this.", "label": label})
    return rows


def capital_qa(n: int, seed: int = 4) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        country, capital = rng.choice(sorted(COUNTRIES.items()))
        rows.append({"question": f"What is the capital of {country}?", "answer": capital})
    return rows


def chats(n: int, seed: int = 5) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        country, capital = rng.choice(sorted(COUNTRIES.items()))
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"Which city is the capital of {country}?"},
                    {"role": "assistant", "content": f"The capital of {country} is {capital}."},
                ]
            }
        )
    return rows


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_all(root: Path, n: int = 200) -> dict[str, Path]:
    """Write every dataset the examples name (relative to s3://BUCKET/) under root/data/."""
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    files = {
        "legal-advice.jsonl": lambda p: _jsonl(p, legal_advice(n)),
        "lines.txt": lambda p: p.write_text("\n".join(text_lines(n)) + "\n"),
        "medical-qa.jsonl": lambda p: _jsonl(p, medical_qa(n)),
        "qa.jsonl": lambda p: _jsonl(p, capital_qa(n)),
        "chat.jsonl": lambda p: _jsonl(p, chats(n)),
    }
    out = {}
    for name, write in files.items():
        write(data / name)
        out[name] = data / name
    with (data / "defendant-letters.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(letters(n))
    out["defendant-letters.csv"] = data / "defendant-letters.csv"
    return out
