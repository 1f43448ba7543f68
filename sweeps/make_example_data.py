"""Write the small example datasets of each data format, made from the shipped CLINC150 slice:

    python sweeps/make_example_data.py      # writes sweeps/data/examples/{alpaca,prompt_completion,messages}

Each is a real task (intent classification over 10 intents) in the shape users bring, in a different
file type, so that every format and source type has a committed config that runs end to end.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sweeps.config import DEFAULT_DATASET_DIR  # noqa: E402

EXAMPLES_DIR = Path(__file__).resolve().parent / "data" / "examples"
INSTRUCTION = "Name the intent of the user's request, as one snake_case label."


def clinc_rows(split: str, intents: list[str], per_intent: int) -> list[dict]:
    rows = [json.loads(l) for l in (DEFAULT_DATASET_DIR / f"{split}.jsonl").read_text().splitlines()]
    kept = []
    for intent in intents:
        kept += [r for r in rows if r["intent"] == intent][:per_intent]
    random.Random(0).shuffle(kept)
    return kept


def main() -> None:
    all_rows = [json.loads(l) for l in (DEFAULT_DATASET_DIR / "train.jsonl").read_text().splitlines()]
    intents = sorted({r["intent"] for r in all_rows})[:10]
    train, test = clinc_rows("train", intents, 30), clinc_rows("test", intents, 10)

    # Alpaca style, one JSON list per split; every other row has an empty input, as in the Alpaca release.
    alpaca = EXAMPLES_DIR / "alpaca"
    alpaca.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", train), ("test", test)):
        records = [{"instruction": INSTRUCTION, "input": r["text"], "output": r["intent"]} if i % 2 == 0 else
                   {"instruction": f"{INSTRUCTION}\nRequest: {r['text']}", "input": "", "output": r["intent"]}
                   for i, r in enumerate(rows)]
        (alpaca / f"{split}.json").write_text(json.dumps(records, indent=1) + "\n")

    # prompt/completion in one Parquet file: lorasweep splits it into train/validation/test by seed.
    from datasets import Dataset

    pc = EXAMPLES_DIR / "prompt_completion"
    pc.mkdir(parents=True, exist_ok=True)
    Dataset.from_list([{"prompt": f"Request: {r['text']}\nIntent:", "completion": f" {r['intent']}"}
                       for r in train + test]).to_parquet(str(pc / "all.parquet"))

    # Chat messages (JSONL), rendered with the model's chat template; the system prompt comes from the config.
    messages = EXAMPLES_DIR / "messages"
    messages.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", train), ("test", test)):
        (messages / f"{split}.jsonl").write_text("".join(
            json.dumps({"messages": [{"role": "user", "content": r["text"]},
                                     {"role": "assistant", "content": r["intent"]}]}) + "\n" for r in rows))
    print(f"wrote {EXAMPLES_DIR}")


if __name__ == "__main__":
    main()
