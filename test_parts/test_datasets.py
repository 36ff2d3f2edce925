"""Datasets and benchmarks (issue 4): each source, stored locally in its hub schema the way `datasets` stores it,
loads into records; answers in each benchmark's style are graded right; eval.py writes its table and samples.

Nothing downloads: every hub name is pointed at a local copy with `name=path` (data.load_records).
"""
import csv
import glob
import json
import os

import datasets
import pytest
from PIL import Image

import data
import rewards

GEO3K_SAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data",
                            "geometry3k-sample", "test.parquet")
V, IMAGE, STRINGS = datasets.Value, datasets.Image(), datasets.List(datasets.Value("string"))


def _image(color, size=(60, 40)):
    return Image.new("RGB", size, color)


def _table(rows, features):
    """Rows (dicts) -> a datasets.Dataset with the given features; images are stored as datasets stores them."""
    return datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in features}, features=datasets.Features(features))


@pytest.fixture(scope="module", autouse=True)
def datasets_cache(tmp_path_factory):
    """Keep the arrow files `datasets` builds from the local copies out of the user's cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_datasets_cache")))
        yield


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    """Local copies of MMK12, MathVista, MathVerse, MathVision and HallusionBench in their hub schemas and in the
    layouts they come in (save_to_disk folders, hub-style parquet folders). Returns name -> path."""
    root = tmp_path_factory.mktemp("hub")
    paths = {}

    # xyliu6/k12-freeform: images, problem, answer; splits train / test -> a save_to_disk DatasetDict
    k12 = {"images": datasets.List(IMAGE), "problem": V("string"), "answer": V("string")}
    datasets.DatasetDict({
        "train": _table([{"images": [_image("red")], "problem": "<image>How many apples? ", "answer": "3"},
                         {"images": [_image("blue")], "problem": "Solve for x: 2x = 1.", "answer": "\\frac{1}{2}"},
                         {"images": [_image("green")], "problem": "<image>Area?", "answer": "12"}], k12),
        "test": _table([{"images": [_image("red")], "problem": "<image>Find the slope.", "answer": "-2"},
                        {"images": [_image("blue")], "problem": "<image>Speed in m/s?", "answer": "2.5"}], k12),
    }).save_to_disk(str(root / "mmk12"))
    paths["mmk12"] = root / "mmk12"

    # AI4Math/MathVista testmini -> data/testmini-00000-of-00001.parquet, as on the hub
    meta = {"category": V("string"), "context": V("string"), "grade": V("string"), "img_height": V("int64"),
            "img_width": V("int64"), "language": V("string"), "skills": STRINGS, "source": V("string"),
            "split": V("string"), "task": V("string")}
    vista = {"pid": V("string"), "question": V("string"), "image": V("string"), "decoded_image": IMAGE,
             "choices": STRINGS, "unit": V("string"), "precision": V("float64"), "answer": V("string"),
             "question_type": V("string"), "answer_type": V("string"), "metadata": meta, "query": V("string")}
    m = {"category": "math-targeted-vqa", "context": "geometry diagram", "grade": "high school", "img_height": 40,
         "img_width": 60, "language": "english", "skills": ["geometry reasoning"], "source": "Geometry3K",
         "split": "testmini", "task": "geometry problem solving"}
    _table([{"pid": "1", "question": "What is the measure of angle B?", "image": "images/1.jpg",
             "decoded_image": _image("red"), "choices": ["30°", "45°", "60°", "90°"], "unit": None,
             "precision": None, "answer": "45°", "question_type": "multi_choice", "answer_type": "text",
             "metadata": m, "query": "..."},
            {"pid": "2", "question": "What is the value of the bar labeled x?", "image": "images/2.jpg",
             "decoded_image": _image("blue"), "choices": None, "unit": None, "precision": 1.0, "answer": "1.5",
             "question_type": "free_form", "answer_type": "float", "metadata": m, "query": "..."}],
           vista).to_parquet(str(root / "mathvista" / "data" / "testmini-00000-of-00001.parquet"))
    paths["mathvista"] = root / "mathvista"

    # AI4Math/MathVerse, config testmini -> testmini.parquet at the repository's root, as on the hub
    verse = {"sample_index": V("string"), "problem_index": V("string"), "problem_version": V("string"),
             "question": V("string"), "image": IMAGE, "answer": V("string"), "question_type": V("string"),
             "metadata": {"split": V("string"), "source": V("string"), "subject": V("string"),
                          "subfield": V("string")},
             "query_wo": V("string"), "query_cot": V("string"), "question_for_eval": V("string")}
    vm = {"split": "testmini", "source": "GeoQA", "subject": "Plane Geometry", "subfield": "Angle"}
    mc = ("As shown in the figure, AB is parallel to CD and angle 1 = 40.0, then angle 2 is ()\n"
          "Choices:\nA:40°\nB:50°\nC:130°\nD:140°")
    _table([{"sample_index": "1", "problem_index": "1", "problem_version": "Text Dominant", "question": mc,
             "image": _image("red"), "answer": "D", "question_type": "multi-choice", "metadata": vm,
             "query_wo": "...", "query_cot": "...", "question_for_eval": mc},
            {"sample_index": "2", "problem_index": "2", "problem_version": "Text Lite",
             "question": "Find the length of AC.", "image": _image("blue"), "answer": "10",
             "question_type": "free-form", "metadata": vm, "query_wo": "...", "query_cot": "...",
             "question_for_eval": "Find the length of AC."},
            {"sample_index": "3", "problem_index": "1", "problem_version": "Vision Only", "question": "",
             "image": _image("green"), "answer": "D", "question_type": "multi-choice", "metadata": vm,
             "query_wo": "...", "query_cot": "...", "question_for_eval": mc}],
           verse).to_parquet(str(root / "mathverse" / "testmini.parquet"))
    paths["mathverse"] = root / "mathverse"

    # MathLLMs/MathVision test (and testmini) -> a save_to_disk DatasetDict
    vision = {"id": V("string"), "question": V("string"), "options": STRINGS, "image": V("string"),
              "decoded_image": IMAGE, "answer": V("string"), "solution": V("string"), "level": V("int64"),
              "subject": V("string")}
    rows = [{"id": "1", "question": "Which of the cubes can be folded from <image1>?",
             "options": ["1", "2", "3", "4", "5"], "image": "images/1.jpg", "decoded_image": _image("red"),
             "answer": "C", "solution": None, "level": 2, "subject": "solid geometry"},
            {"id": "2", "question": "How many triangles are there in the picture?", "options": [],
             "image": "images/2.jpg", "decoded_image": _image("blue"), "answer": "7", "solution": None, "level": 1,
             "subject": "counting"}]
    datasets.DatasetDict({"test": _table(rows, vision), "testmini": _table(rows[:1], vision)}).save_to_disk(
        str(root / "mathvision"))
    paths["mathvision"] = root / "mathvision"

    # lmms-lab/HallusionBench -> data/image-*.parquet and data/non_image-*.parquet, as on the hub
    hallu = {k: V("string") for k in ("category", "subcategory", "visual_input", "set_id", "figure_id", "sample_note",
                                      "question_id", "question", "gt_answer_details", "gt_answer", "filename")}
    hallu["image"] = IMAGE

    def hallu_row(i, question, gt, image):
        return {"category": "VD", "subcategory": "illusion", "visual_input": "1" if image else "0", "set_id": "0",
                "figure_id": str(i), "sample_note": "circle", "question_id": str(i), "question": question,
                "gt_answer_details": "", "gt_answer": gt, "filename": f"VD/illusion/0_{i}.png", "image": image}
    _table([hallu_row(0, "Is the left orange circle the same size as the right one?", "1", _image("orange")),
            hallu_row(1, "Is the left orange circle larger than the right one?", "0", _image("orange")),
            hallu_row(2, "Is the line on top longer?", "0", _image("gray"))],
           hallu).to_parquet(str(root / "hallusionbench" / "data" / "image-00000-of-00001.parquet"))
    _table([hallu_row(3, "Is Paris the capital of France?", "1", None)],
           hallu).to_parquet(str(root / "hallusionbench" / "data" / "non_image-00000-of-00001.parquet"))
    paths["hallusionbench"] = root / "hallusionbench"
    return {k: str(v) for k, v in paths.items()}


def _check_shape(records):
    for i in range(len(records)):
        r = records[i]
        assert set(r) == {"images", "problem", "answer", "choices"}
        assert len(r["images"]) == 1 and isinstance(r["images"][0], Image.Image)
        assert r["problem"].count(data.IMAGE_PLACEHOLDER) == 1
        assert isinstance(r["answer"], str) and isinstance(r["choices"], list)


def _box(answer):
    return f"<think>I read the figure.</think> The answer is \\boxed{{{answer}}}."


# ----------------------------------------------------------------------------- loaders, one per source

def test_data_geometry3k_real_sample():
    raw = datasets.load_dataset("parquet", data_files=GEO3K_SAMPLE, split="train")
    for spec in (f"geometry3k={GEO3K_SAMPLE}", f"geo3k={os.path.dirname(GEO3K_SAMPLE)}"):  # a file, a folder
        records = data.load_records(spec, "test")
        assert len(records) == 6
        _check_shape(records)
        for i in range(6):
            assert records[i]["problem"] == raw[i]["problem"] and records[i]["answer"] == raw[i]["answer"]
            assert records[i]["choices"] == []  # trained free-form: the problem shows no options
            assert records[i]["images"][0].mode == "RGBA" and records[i]["images"][0].size == raw[i]["images"][0].size
    assert records[3]["answer"] == "5 \\sqrt { 3 }"


def test_data_mmk12_splits(copies):
    train = data.load_records(f"mmk12={copies['mmk12']}", "train")
    test = data.load_records(f"mmk12={copies['mmk12']}", "test")
    assert (len(train), len(test)) == (3, 2)
    _check_shape(train)
    _check_shape(test)
    assert train[1]["problem"] == "<image>Solve for x: 2x = 1."  # the placeholder goes first when missing
    assert train[1]["answer"] == "\\frac{1}{2}" and test[0]["answer"] == "-2"
    assert train[0]["images"][0].getpixel((0, 0)) == (255, 0, 0)


def test_data_mathvista_testmini(copies):
    records = data.load_records(f"mathvista={copies['mathvista']}", "train")  # one split: testmini, whatever asked
    assert len(records) == 2
    _check_shape(records)
    mc, free = records[0], records[1]
    assert mc["problem"] == ("<image>What is the measure of angle B?\nChoices:\n(A) 30°\n(B) 45°\n(C) 60°\n(D) 90°")
    assert mc["choices"] == ["30°", "45°", "60°", "90°"] and mc["answer"] == "45°"
    assert free["problem"] == "<image>What is the value of the bar labeled x?" and free["choices"] == []
    assert free["images"][0].getpixel((0, 0)) == (0, 0, 255)  # decoded_image, not the file name in `image`


def test_data_mathverse_testmini(copies):
    records = data.load_records(f"mathverse={copies['mathverse']}", "test")
    assert len(records) == 3
    _check_shape(records)
    assert records[0]["choices"] == ["40°", "50°", "130°", "140°"] and records[0]["answer"] == "D"
    assert records[0]["problem"].startswith("<image>As shown in the figure")
    assert records[1]["choices"] == [] and records[1]["answer"] == "10"
    assert records[2]["problem"] == "<image>Answer the question shown in the image."  # Vision Only
    assert records[2]["choices"] == []


def test_data_mathverse_hub_snapshot(copies, tmp_path):
    # a download of the hub repository: README.md names two configs, and datasets wants one of them
    import shutil
    shutil.copy(os.path.join(copies["mathverse"], "testmini.parquet"), tmp_path / "testmini.parquet")
    shutil.copy(os.path.join(copies["mathverse"], "testmini.parquet"), tmp_path / "testmini_text_only.parquet")
    (tmp_path / "README.md").write_text(
        "---\nconfigs:\n- config_name: testmini\n  data_files:\n  - split: testmini\n    path: testmini.parquet\n"
        "- config_name: testmini_text_only\n  data_files:\n  - split: testmini_text_only\n"
        "    path: testmini_text_only.parquet\n---\n# MathVerse\n")
    records = data.load_records(f"mathverse={tmp_path}", "test")
    assert len(records) == 3 and records[0]["answer"] == "D"


def test_data_mathvision_test(copies):
    records = data.load_records(f"mathvision={copies['mathvision']}", "test")
    assert len(records) == 2  # the test split, not testmini
    _check_shape(records)
    assert records[0]["problem"] == ("Which of the cubes can be folded from <image>?\n"
                                     "Choices:\n(A) 1\n(B) 2\n(C) 3\n(D) 4\n(E) 5")
    assert records[0]["choices"] == ["1", "2", "3", "4", "5"] and records[0]["answer"] == "C"
    assert records[1]["problem"] == "<image>How many triangles are there in the picture?"
    assert records[1]["choices"] == []


def test_data_hallusionbench_image_split(copies):
    records = data.load_records(f"hallusionbench={copies['hallusionbench']}", "test")
    assert len(records) == 3  # the questions with a figure; non_image is left out
    _check_shape(records)
    assert [records[i]["answer"] for i in range(3)] == ["yes", "no", "no"]
    assert records[0]["problem"] == "<image>Is the left orange circle the same size as the right one?"


def test_data_local_record_schema(tmp_path):
    features = {"images": datasets.List(IMAGE), "problem": V("string"), "answer": V("string"), "choices": STRINGS}
    _table([{"images": [_image("red")], "problem": "<image>Which colour?", "answer": "red",
             "choices": ["red", "blue"]},
            {"images": [_image("blue")], "problem": "How many squares?", "answer": "4", "choices": []}],
           features).to_parquet(str(tmp_path / "mine" / "test.parquet"))
    for path in (str(tmp_path / "mine"), str(tmp_path / "mine" / "test.parquet")):
        records = data.load_records(path, "test")
        _check_shape(records)
        assert records[0]["choices"] == ["red", "blue"] and records[1]["problem"] == "<image>How many squares?"
    assert len(data.load_records(GEO3K_SAMPLE, "test")) == 6  # a hub-schema parquet also fits the record schema


def test_data_bad_names_fail_clearly(copies, tmp_path):
    with pytest.raises(SystemExit, match="unknown dataset 'geometry4k'"):
        data.load_records("geometry4k", "test")
    with pytest.raises(SystemExit, match="does not exist"):
        data.load_records(f"mathvista={tmp_path / 'nowhere'}", "test")
    with pytest.raises(SystemExit, match="no split 'validation'"):
        data.load_records(f"mmk12={copies['mmk12']}", "validation")


def test_data_inline_choices():
    assert data._inline_choices("Find x.\nChoices:\nA:40°\nB:50°\nC:60°") == ["40°", "50°", "60°"]
    assert data._inline_choices("Which?\nChoices:\nA. 5 cm\nB. 5 m") == ["5 cm", "5 m"]
    assert data._inline_choices("Find x.\nChoices:\nA:1\nC:3") == []  # a gap: not read as options
    assert data._inline_choices("Find the length of AC.") == []


# ----------------------------------------------------------------------------- prompt length

def test_data_usable_records_drops_long_prompts_and_counts(capsys):
    from model import tiny_tokenizer
    tok = tiny_tokenizer()
    records = data.load_records(f"geometry3k={GEO3K_SAMPLE}", "test")
    lo, hi = 28 * 28 * 4, 28 * 28 * 64
    lengths = []
    for i in range(len(records)):  # the real path: resize the image, build the prompt
        x = data.load_image(records[i]["images"][0], lo, hi)
        lengths.append(len(data.build_prompt(tok, records[i]["problem"], data.n_image_tokens(x))))
    limit = sorted(lengths)[2]
    kept, counts = data.usable_records(records, tok, lo, hi, limit)
    expected = [i for i, n in enumerate(lengths) if n <= limit]
    assert counts == {"kept": len(expected), "dropped": 6 - len(expected),
                      f"prompt over {limit} tokens": 6 - len(expected)} and 0 < len(expected) < 6
    assert [kept[j]["problem"] for j in range(len(kept))] == [records[i]["problem"] for i in expected]
    assert f"{len(expected)} of 6 rows usable; skipped: {6 - len(expected)} prompt over {limit} tokens" in capsys.readouterr().out
    _check_shape(kept)  # still records, still lazy
    assert data.usable_records(records, tok, lo, hi, 10 ** 6)[1] == {"kept": 6, "dropped": 0}


def test_data_bad_rows_are_skipped_with_counted_reasons(tmp_path, capsys):
    import io
    from PIL import Image
    from model import tiny_tokenizer
    tok = tiny_tokenizer()
    good = Image.new("RGB", (60, 40), "white")
    png = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(png, format="PNG")
    truncated = Image.open(io.BytesIO(png.getvalue()[:60]))  # a PNG cut short: the header reads, the pixels do not
    rows = [
        {"images": [good], "problem": "<image>ok", "answer": "1"},
        {"images": [Image.new("L", (50, 70), 128)], "problem": "gray", "answer": "2"},  # grayscale: usable
        {"images": [Image.new("RGBA", (30, 30), (0, 0, 0, 0))], "problem": "rgba", "answer": "3"},  # usable
        {"images": [], "problem": "<image>no image", "answer": "1"},
        {"images": [truncated], "problem": "<image>corrupt", "answer": "1"},
        {"images": [Image.new("RGB", (3000, 10))], "problem": "<image>strip", "answer": "1"},  # aspect ratio 300
        {"images": [good], "problem": "<image>empty answer", "answer": "  "},
        {"images": [good, good], "problem": "<image> and <image>", "answer": "1"},
        {"images": [good], "problem": "<image> and <image>", "answer": "1"},
        {"images": [good], "problem": "<image>sneaky <|image_pad|>", "answer": "1"},
    ]
    kept, counts = data.usable_records(rows, tok, 56 * 56, 28 * 28 * 16, 10 ** 6, name="fixture")
    assert [r["problem"] for r in kept] == ["<image>ok", "gray", "rgba"]
    assert counts == {"kept": 3, "dropped": 7, "missing image": 1, "unreadable image (OSError)": 1,
                      "unreadable image (ValueError)": 1, "empty answer": 1, "more than one image": 2,
                      "special token in the problem text": 1}
    assert "fixture: 3 of 10 rows usable; skipped: " in capsys.readouterr().out
    for r in kept:  # and what is kept really goes through the pixel pipeline
        x = data.load_image(r["images"][0], 56 * 56, 28 * 28 * 16)
        assert x.shape[0] == 3 and data.image_to_pixels(x)[0].shape[1] == 1176
    with pytest.raises(SystemExit, match="fixture: no usable row"):
        data.usable_records(rows[3:], tok, 56 * 56, 28 * 28 * 16, 10 ** 6, name="fixture")


# ----------------------------------------------------------------------------- grading, per benchmark

def test_eval_answer_styles(copies):
    def graded(spec, i, answer_text):
        r = data.load_records(spec, "test")[i]
        return rewards.score(_box(answer_text), r["answer"], r["choices"])["accuracy"] == 1.0

    geo = f"geometry3k={GEO3K_SAMPLE}"
    assert graded(geo, 3, "5\\sqrt{3}") and graded(geo, 5, "\\frac{2\\sqrt{2}}{5}") and graded(geo, 0, "80^\\circ")
    assert not graded(geo, 3, "C")  # free-form: a bare letter is not an answer
    mmk12 = f"mmk12={copies['mmk12']}"
    assert graded(mmk12, 1, "2.5") and graded(mmk12, 1, "\\frac{5}{2}") and graded(mmk12, 0, "-2")
    vista = f"mathvista={copies['mathvista']}"
    assert graded(vista, 0, "B") and graded(vista, 0, "(B)") and graded(vista, 0, "45°")  # letter or option text
    assert not graded(vista, 0, "A") and not graded(vista, 0, "30°")
    assert graded(vista, 1, "1.5") and not graded(vista, 1, "15")
    verse = f"mathverse={copies['mathverse']}"
    assert graded(verse, 0, "D") and graded(verse, 0, "140°") and not graded(verse, 0, "C")
    assert graded(verse, 2, "D") and graded(verse, 1, "10")
    vision = f"mathvision={copies['mathvision']}"
    assert graded(vision, 0, "C") and graded(vision, 0, "3") and not graded(vision, 0, "D")
    assert graded(vision, 1, "7") and not graded(vision, 1, "8")
    hallu = f"hallusionbench={copies['hallusionbench']}"
    assert graded(hallu, 0, "Yes") and graded(hallu, 0, "yes.") and not graded(hallu, 0, "no")
    assert graded(hallu, 1, "No") and not graded(hallu, 1, "Yes")


# ----------------------------------------------------------------------------- eval.py

def test_eval_writes_table_and_samples(copies, tmp_path, capsys):
    import eval as evaluation
    out = tmp_path / "eval"
    benchmarks = f"geo3k={GEO3K_SAMPLE},hallusionbench={copies['hallusionbench']}"
    rows = evaluation.main(["--model", "tiny", "--benchmarks", benchmarks, "--limit", "2", "--batch_size", "2",
                            "--max_response_len", "6",
                            "--min_pixels", str(28 * 28 * 4), "--max_pixels", str(28 * 28 * 16), "--out_dir", str(out)])
    printed = capsys.readouterr().out
    assert [r["benchmark"] for r in rows] == ["geo3k", "hallusionbench"]
    assert all(r["problems"] == 2 and r["dropped"] == 0 for r in rows)
    assert "geo3k" in printed and "hallusionbench" in printed and "average" in printed
    results = json.load(open(out / "results.json"))
    assert results["model"] == "tiny" and len(results["benchmarks"]) == 2
    assert results["average"] == pytest.approx(sum(r["accuracy"] for r in rows) / 2)
    table = list(csv.DictReader(open(out / "results.csv")))
    assert [t["benchmark"] for t in table] == ["geo3k", "hallusionbench", "average"]
    samples = [json.loads(line) for line in open(out / "samples.jsonl")]
    assert len(samples) == 4 and [s["benchmark"] for s in samples] == ["geo3k"] * 2 + ["hallusionbench"] * 2
    for s in samples:
        assert {"question", "response", "extracted", "correct", "answer"} <= set(s)
        assert s["correct"] == (rewards.score(s["response"], s["answer"], s["choices"])["accuracy"] == 1.0)
    assert samples[2]["answer"] == "yes" and samples[0]["question"].startswith("<image>")


def test_eval_drops_long_prompts_and_counts(tmp_path):
    import eval as evaluation
    args = ["--model", "tiny", "--benchmarks", f"geo3k={GEO3K_SAMPLE}", "--max_response_len", "4",
            "--min_pixels", str(28 * 28 * 4), "--max_pixels", str(28 * 28 * 16), "--out_dir", str(tmp_path)]
    with pytest.raises(SystemExit, match=r"geo3k: no usable row \(6 prompt over 100 tokens\)"):
        evaluation.main(args + ["--max_prompt_len", "100"])  # every prompt is over 100 tokens
    rows = evaluation.main(args + ["--max_prompt_len", "400", "--limit", "2"])
    assert rows[0]["problems"] + rows[0]["dropped"] == 2


# ----------------------------------------------------------------------------- recipes

def test_data_configs_assign_train_constants():
    import configurator
    import train
    files = sorted(glob.glob(os.path.join(os.path.dirname(data.__file__), "config", "*.py")))
    recipes = [f for f in files if os.path.basename(f) != "demo.py"]
    names = {f"{run}{size}.py" for run in ("geo3k_saei", "geo3k_grpo", "mmk12_saei") for size in ("", "_3b")}
    assert {os.path.basename(f) for f in recipes} == names
    for f in recipes:
        cfg = configurator.override(train.DEFAULTS, [f])  # only train.py's names, with train.py's types
        assert cfg["dataset"] in data.SOURCES
        assert cfg["model"] == ("Qwen2.5-VL-3B" if f.endswith("_3b.py") else "Qwen2.5-VL-7B")
        assert (cfg["n_clean"], cfg["n_adv"]) == ((12, 0) if "grpo" in f else (6, 6))
        update = (cfg["lr"], cfg["weight_decay"], cfg["clip_low"], cfg["clip_high"], cfg["kl_coef"])
        assert update == (1e-6, 1e-2, 0.2, 0.2, 0.0)
        assert (cfg["temperature"], cfg["max_prompt_len"], cfg["max_response_len"]) == (1.0, 2048, 2048)
        assert (cfg["min_pixels"], cfg["max_pixels"], cfg["freeze_vision"]) == (262144, 1000000, True)
