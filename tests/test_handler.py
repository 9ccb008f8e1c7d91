"""The Inference Endpoints handler shipped in every model repo: base64 / raw-bytes images in, ranked labels out."""

import ast
import base64
import io
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers_repo_template import (
    BLOCK_PROJECT_MODULES,
    HANDLER,
    PROJECT_MODULES,
    SPACE_APP,
    copy_model_repo,
    image_bytes,
    load_module,
    sample_images,
)
from PIL import Image

SAMPLES = sample_images()


@pytest.fixture(scope="module")
def handler(tiny_folder):
    return load_module(HANDLER, "handler").EndpointHandler(str(tiny_folder))


def expected_probabilities(tiny, raw: bytes) -> dict[str, float]:
    model, image_processor, _ = tiny
    with torch.no_grad():
        logits = model(**image_processor(Image.open(io.BytesIO(raw)))).logits
    return dict(zip(model.config.labels, logits.softmax(-1)[0].tolist()))


def assert_ranked(result: list, labels: list[str], top_k=None):
    scores = [entry["score"] for entry in result]
    assert scores == sorted(scores, reverse=True)
    assert all(isinstance(entry["score"], float) and 0 <= entry["score"] <= 1 for entry in result)
    if top_k is None:
        assert sorted(entry["label"] for entry in result) == sorted(labels)
        assert abs(sum(scores) - 1) < 1e-5
    else:
        assert len(result) == top_k and len({entry["label"] for entry in result}) == top_k


def imported_modules(path) -> list[tuple[str, str | None]]:
    """(top-level module, enclosing function or None) for every import statement in a file."""
    found = []

    def visit(node, function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((alias.name.split(".")[0], function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                found.append(((child.module or "").split(".")[0], function))
            visit(child, child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function)

    visit(ast.parse(path.read_text()), None)
    return found


def test_repo_template_imports_only_pypi_packages():
    handler_imports = {module for module, _ in imported_modules(HANDLER)}
    assert handler_imports <= {"base64", "binascii", "io", "os", "reprlib", "torch", "PIL", "transformers"}, (
        handler_imports
    )
    # The app may build a tiny model with the package, lazily, only when no model is given.
    project = [(m, f) for m, f in imported_modules(SPACE_APP) if m in PROJECT_MODULES]
    assert project == [("emovlm_kd", "build_tiny_model_folder")], project


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_base64_and_raw_bytes_give_the_model_probabilities(handler, tiny, name):
    image, image_format = SAMPLES[name]
    raw = image_bytes(image, image_format)
    expected = expected_probabilities(tiny, raw)
    encoded = base64.b64encode(raw).decode()
    mime = f"image/{image_format.lower()}"
    requests = {
        "base64": {"inputs": encoded},
        "data_url": {"inputs": f"data:{mime};base64,{encoded}"},
        "raw_bytes": {"inputs": raw},
        "base64_as_bytes": {"inputs": encoded.encode()},
        "pil": {"inputs": Image.open(io.BytesIO(raw))},  # what the toolkit passes for an image/* request body
    }
    for kind, request in requests.items():
        result = handler(request)
        assert_ranked(result, tiny[0].config.labels)
        for entry in result:
            assert abs(entry["score"] - expected[entry["label"]]) < 1e-5, (kind, entry, expected)


def test_top_k_and_batches(handler, tiny):
    raws = [image_bytes(image, image_format) for image, image_format in SAMPLES.values()]
    singles = [handler({"inputs": raw}) for raw in raws]
    top_two = handler({"inputs": raws[0], "parameters": {"top_k": 2}})
    assert_ranked(top_two, tiny[0].config.labels, top_k=2)
    assert top_two == singles[0][:2]
    assert handler({"inputs": raws[0], "parameters": {"top_k": 50}}) == singles[0]  # capped at the class count
    assert handler({"inputs": raws[0], "parameters": {}}) == singles[0]

    handler.max_batch_size = 4  # 6 images -> two chunks
    try:
        batch = handler({"inputs": [base64.b64encode(raw).decode() for raw in raws], "parameters": {"top_k": 3}})
    finally:
        handler.max_batch_size = 16
    assert len(batch) == len(raws)
    for single, batched in zip(singles, batch):
        assert [entry["label"] for entry in batched] == [entry["label"] for entry in single]
        for a, b in zip(single, batched):
            assert abs(a["score"] - b["score"]) < 1e-5


def test_min_score_answers_uncertain_below_it(handler, tiny, monkeypatch):
    raws = [image_bytes(image, image_format) for image, image_format in list(SAMPLES.values())[:2]]
    singles = [handler({"inputs": raw}) for raw in raws]
    top = singles[0][0]
    confident = handler({"inputs": raws[0], "parameters": {"min_score": top["score"] - 1e-6}})
    assert confident == {"label": top["label"], "score": top["score"], "uncertain": False, "predictions": singles[0]}
    uncertain = handler({"inputs": raws, "parameters": {"min_score": 1.0, "top_k": 2}})
    assert [answer["label"] for answer in uncertain] == [None, None] and all(a["uncertain"] for a in uncertain)
    assert [answer["predictions"] for answer in uncertain] == [single[:2] for single in singles]
    assert handler({"inputs": raws[0], "parameters": {"min_score": 0}})["label"] == top["label"]
    _spy_on_explain(monkeypatch, handler)
    explained = handler({"inputs": raws[0], "parameters": {"min_score": 1.0, "explain": True}})
    assert explained["label"] is None and set(explained) == {
        "label", "score", "uncertain", "predictions", "explanation", "explanation_labels"
    }  # fmt: skip


def test_non_finite_logits_are_refused(handler, monkeypatch):
    forward = handler.model.forward

    def broken(*args, **kwargs):
        outputs = forward(*args, **kwargs)
        outputs.logits[0, 0] = float("nan")
        return outputs

    monkeypatch.setattr(handler.model, "forward", broken)
    with pytest.raises(RuntimeError, match="non-finite logits"):
        handler({"inputs": GOOD})


def _truncated_png() -> bytes:
    raw = image_bytes(Image.new("RGB", (64, 64), (1, 2, 3)), "PNG")
    return raw[: len(raw) // 2]


GOOD = base64.b64encode(image_bytes(Image.new("RGB", (20, 20)), "PNG")).decode()


@pytest.mark.parametrize(
    "data, message",
    [
        ({"inputs": ""}, r"inputs is an empty string"),
        ({"inputs": "   "}, r"inputs is an empty string"),
        ({"inputs": b""}, r"inputs is empty \(0 bytes\)"),
        ({"inputs": "https://example.com/cat.jpg"}, r"inputs is a URL .*fetches nothing: send the image in base64"),
        ({"inputs": "not base64 at all!"}, r"inputs is not valid base64"),
        ({"inputs": "data:image/png,abc"}, r"without ';base64'"),
        ({"inputs": base64.b64encode(b"just some text").decode()}, r"read image inputs: cannot identify .* JPEG, PNG"),
        ({"inputs": b"\x00\x01 binary junk"}, r"Could not read image inputs: cannot identify"),
        ({"inputs": _truncated_png()}, r"Could not read image inputs: .*truncated"),
        ({"inputs": 42}, r"inputs must be a base64-encoded image string or raw image bytes, got int"),
        ({"inputs": [GOOD, "???"]}, r"inputs\[1\] is not valid base64"),
        ({"inputs": []}, r"'inputs' is an empty list"),
        ({"image": GOOD}, r"'inputs' field"),
        ("a string body", r"'inputs' field"),
        ({"inputs": GOOD, "parameters": {"top_k": 0}}, r"'top_k' must be a positive integer, got 0"),
        ({"inputs": GOOD, "parameters": {"top_k": "3"}}, r"'top_k' must be a positive integer, got '3'"),
        ({"inputs": GOOD, "parameters": {"top_k": True}}, r"'top_k' must be a positive integer"),
        ({"inputs": GOOD, "parameters": {"topk": 2}}, r"Unknown parameter\(s\) \['topk'\]"),
        ({"inputs": GOOD, "parameters": [1]}, r"'parameters' must be an object"),
        ({"inputs": GOOD, "parameters": {"explain": "yes"}}, r"'explain' must be true or false, got 'yes'"),
        ({"inputs": GOOD, "parameters": {"explain_task": "observation"}}, r"\['explain_task'\] only apply with"),
        ({"inputs": GOOD, "parameters": {"explain": True, "explain_task": "why"}}, r"'explain_task' must be one of"),
        ({"inputs": GOOD, "parameters": {"explain": True, "max_new_tokens": 0}}, r"'max_new_tokens' must be a posi"),
        ({"inputs": GOOD, "parameters": {"explain": True, "max_new_tokens": 257}}, r"limit of 256 tokens per expl"),
        ({"inputs": GOOD, "parameters": {"min_score": 1.5}}, r"'min_score' must be a number in \[0, 1\] .*, got 1.5"),
        ({"inputs": GOOD, "parameters": {"min_score": -0.1}}, r"'min_score' must be a number in \[0, 1\]"),
        ({"inputs": GOOD, "parameters": {"min_score": "0.5"}}, r"'min_score' must be a number in \[0, 1\]"),
        ({"inputs": GOOD, "parameters": {"min_score": float("nan")}}, r"'min_score' must be a number in \[0, 1\]"),
        ({"inputs": GOOD, "parameters": {"min_score": True}}, r"'min_score' must be a number in \[0, 1\]"),
    ],
)
def test_bad_input_errors_name_the_problem(handler, data, message):
    with pytest.raises(ValueError, match=message):
        handler(data)


def _spy_on_explain(monkeypatch, handler, generate: bool = True) -> list[dict]:
    """The task and budget of every `explain` call of the handler's model (which, unless `generate`, returns a fixed
    text per image instead of generating)."""
    calls, explain = [], handler.model.explain

    def spy(**kwargs):
        calls.append({name: value for name, value in kwargs.items() if name in ("task", "max_new_tokens")})
        return explain(**kwargs) if generate else ["A text."] * len(kwargs["image_grid_thw"])

    monkeypatch.setattr(handler.model, "explain", spy)
    return calls


def test_explanations_are_opt_in_and_leave_the_predictions_identical(handler, tiny, monkeypatch):
    model, image_processor, _ = tiny
    raws = [image_bytes(image, image_format) for image, image_format in list(SAMPLES.values())[:2]]
    encoded = [base64.b64encode(raw).decode() for raw in raws]
    calls = _spy_on_explain(monkeypatch, handler)
    plain = handler({"inputs": encoded, "parameters": {"top_k": 2}})
    assert calls == []  # nothing is generated without "explain": true
    explained = handler({"inputs": encoded, "parameters": {"top_k": 2, "explain": True, "max_new_tokens": 6}})
    assert calls == [{"task": "inference", "max_new_tokens": 6}]  # one batch, one generation
    # what the model itself generates for the same batch of prepared images
    prepared = [image_processor.prepare_image(raw) for raw in raws]
    with torch.no_grad():
        expected = model.explain(**image_processor(prepared), max_new_tokens=6)
    for result, scores, text in zip(explained, plain, expected):
        assert sorted(result) == ["explanation", "explanation_labels", "predictions"]
        assert result["predictions"] == scores
        assert result["explanation"] == text
        assert result["explanation_labels"] == model.config.labels_named_in(text)

    request = {"inputs": raws[0], "parameters": {"explain": True, "explain_task": "observation", "max_new_tokens": 3}}
    single = handler(request)
    assert calls[-1] == {"task": "observation", "max_new_tokens": 3}
    assert isinstance(single, dict) and single["predictions"] == handler({"inputs": raws[0]})
    json.dumps(single)  # a JSON response


def test_explanation_token_cap(tiny_folder, monkeypatch):
    module = load_module(HANDLER, "handler_with_token_cap")
    monkeypatch.setenv("EMOVLM_KD_MAX_EXPLANATION_TOKENS", "5")
    capped = module.EndpointHandler(str(tiny_folder))
    assert capped.max_explanation_tokens == 5
    calls = _spy_on_explain(monkeypatch, capped, generate=False)
    capped({"inputs": GOOD, "parameters": {"explain": True}})
    assert calls == [{"task": "inference", "max_new_tokens": 5}]  # the config's 256, capped
    with pytest.raises(ValueError, match=r"'max_new_tokens' is 6, more than the limit of 5 .*EXPLANATION_TOKENS"):
        capped({"inputs": GOOD, "parameters": {"explain": True, "max_new_tokens": 6}})
    capped.max_explanation_tokens = 0  # no limit
    capped({"inputs": GOOD, "parameters": {"explain": True, "max_new_tokens": 300}})
    capped({"inputs": GOOD, "parameters": {"explain": True}})
    assert calls[-2:] == [{"task": "inference", "max_new_tokens": 300}, {"task": "inference", "max_new_tokens": 256}]
    monkeypatch.setenv("EMOVLM_KD_MAX_EXPLANATION_TOKENS", "many")
    with pytest.raises(ValueError, match="MAX_EXPLANATION_TOKENS must be an integer"):
        module.EndpointHandler(str(tiny_folder))


def test_an_explanation_naming_another_class_is_returned_verbatim(handler, monkeypatch):
    predicted = handler({"inputs": GOOD, "parameters": {"top_k": 1}})[0]["label"]
    other = next(label for label in handler.labels if label != predicted)
    text = f"It is {other}, clearly; not {predicted.capitalize()}."
    monkeypatch.setattr(handler.model, "explain", lambda **kwargs: [text])
    result = handler({"inputs": GOOD, "parameters": {"top_k": 1, "explain": True}})
    assert result == {
        "predictions": [{"label": predicted, "score": result["predictions"][0]["score"]}],
        "explanation": text,
        "explanation_labels": [other, predicted],
    }


FRESH_HANDLER_SCRIPT = BLOCK_PROJECT_MODULES + textwrap.dedent(
    """
    import base64, importlib.util, io, json
    from PIL import Image

    repo, out_path = sys.argv[1], sys.argv[2]
    spec = importlib.util.spec_from_file_location("handler", f"{repo}/handler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    handler = module.EndpointHandler(repo)

    def encode(image, image_format):
        buffer = io.BytesIO()
        image.save(buffer, format=image_format)
        return buffer.getvalue()

    png = encode(Image.new("RGB", (90, 70), (210, 40, 40)), "PNG")
    jpeg = encode(Image.linear_gradient("L").resize((80, 80)), "JPEG")
    results = {
        "model_module": type(handler.model).__module__,
        "base64_png": handler({"inputs": base64.b64encode(png).decode()}),
        "raw_jpeg_top2": handler({"inputs": jpeg, "parameters": {"top_k": 2}}),
        "batch": handler({"inputs": [base64.b64encode(png).decode(), jpeg]}),
        "explained": handler({"inputs": png, "parameters": {"explain": True, "max_new_tokens": 4}}),
    }
    try:
        handler({"inputs": b"not an image"})
    except ValueError as error:
        results["error"] = str(error)
    json.dump(results, open(out_path, "w"))
    """
)


@pytest.mark.slow
def test_handler_runs_from_a_model_repo_without_the_package(handler, tiny_folder, tmp_path):
    repo = copy_model_repo(tiny_folder, tmp_path / "repo")
    script = tmp_path / "endpoint.py"
    script.write_text(FRESH_HANDLER_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), str(repo), str(tmp_path / "out.json")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    out = json.loads((tmp_path / "out.json").read_text())

    assert out["model_module"].startswith("transformers_modules.")  # the repo's code, not the package's
    labels = handler.labels
    assert_ranked(out["base64_png"], labels)
    assert_ranked(out["raw_jpeg_top2"], labels, top_k=2)
    assert [entry["label"] for entry in out["batch"][0]] == [entry["label"] for entry in out["base64_png"]]
    png = image_bytes(Image.new("RGB", (90, 70), (210, 40, 40)), "PNG")
    for fresh, here in zip(out["base64_png"], handler({"inputs": png})):
        assert fresh["label"] == here["label"] and abs(fresh["score"] - here["score"]) < 1e-5
    assert "Could not read image inputs" in out["error"]
    assert out["explained"]["predictions"] == out["base64_png"] and isinstance(out["explained"]["explanation"], str)
