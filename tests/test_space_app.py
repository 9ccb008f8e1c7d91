"""The Gradio Space app: its predictions and gate view, how it finds its model, and end to end in headless Chromium."""

import copy
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from helpers_browser import chromium, free_port, wait_for_server
from helpers_repo_template import (
    BLOCK_PROJECT_MODULES,
    ENDPOINT_REQUIREMENTS,
    REPO_ROOT,
    SPACE_APP,
    SPACE_DIR,
    SPACE_REQUIREMENTS,
    copy_model_repo,
    load_module,
)
from huggingface_hub import SpaceCard
from PIL import Image

EXPLANATION_TOKENS = 12  # the app's --max-new-tokens in the browser test
GATE_TEXT = {  # what the gate view says about each gate's own weights
    "concat_linear": "Fused logit = from distilled head + from VLM branch + bias",
    "bilinear": "no per-branch split",
    "moe": "Expert routing: expert 1",
    "dynamic_weighting": "Per-image weights: distilled head",
    "cross_gating": "Mean per-class gate",
}


@pytest.fixture(scope="module")
def app():
    return load_module(SPACE_APP, "emovlm_kd_space_app")


@pytest.fixture(scope="module")
def predictor(app, tiny_folder):
    return app.EmotionPredictor(str(tiny_folder))


def fused_probabilities(tiny, image) -> torch.Tensor:
    model, image_processor, _ = tiny
    with torch.no_grad():
        return model(**image_processor([image])).logits.softmax(-1)[0]


@pytest.mark.parametrize("gate_type", sorted(GATE_TEXT))
def test_branch_contributions_add_up_to_the_fused_logits(app, tiny, gate_type):
    from modeling_emovlm_kd import GATES

    model, image_processor, _ = tiny
    model = copy.deepcopy(model)
    model.config.gate_type = gate_type
    model.config.calibration_temperature = 1.7  # the parts are divided by it, as the fused logits are
    torch.manual_seed(0)
    model.gate = GATES[gate_type](model.config.num_labels, num_experts=model.config.gate_num_experts)
    images = [Image.new("RGB", (80, 60), (200, 30, 30)), Image.linear_gradient("L").resize((90, 90))]
    with torch.no_grad():
        out = model(**image_processor(images))
        for row in range(len(images)):
            weights = None if out.gate_weights is None else out.gate_weights[row]
            parts = app.branch_contributions(model, out.head_logits[row], out.vlm_scores[row], weights)
            logits, head_logits = out.logits[row], out.head_logits[row]
            prediction = {"fused": logits.softmax(-1), "vlm": out.vlm_scores[row], "head": head_logits.softmax(-1)}
            prediction.update(logits=logits, contributions=parts, gate_weights=weights, seconds=0.1, device="CPU")
            labels = model.config.labels
            text = app.gate_markdown(prediction, labels, gate_type)
            assert GATE_TEXT[gate_type] in text, text
            if gate_type == "bilinear":
                assert parts is None and app.gate_summary(prediction) is None
                continue
            total = parts["head"] + parts["vlm"] + parts["bias"]
            torch.testing.assert_close(total, out.logits[row].float(), atol=1e-5, rtol=1e-5)
            assert parts["head"].abs().sum() > 0 and parts["vlm"].abs().sum() > 0
            assert "fused logit |" in text and abs(sum(app.gate_summary(prediction).values()) - 1) < 1e-6


def test_predictor_shows_every_branch(app, predictor, tiny):
    image = Image.new("RGB", (120, 90), (40, 60, 200))
    prediction = predictor(image)
    labels = predictor.labels
    for key in ("fused", "vlm", "head"):
        assert prediction[key].shape == (len(labels),) and abs(float(prediction[key].sum()) - 1) < 1e-5
    torch.testing.assert_close(prediction["fused"], fused_probabilities(tiny, image), atol=1e-5, rtol=1e-5)
    model = tiny[0]
    with torch.no_grad():
        out = model(**tiny[1]([image]))
    torch.testing.assert_close(prediction["vlm"], out.vlm_scores[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(prediction["head"], out.head_logits[0].softmax(-1), atol=1e-5, rtol=1e-5)

    share = app.gate_summary(prediction)
    assert set(share) == {app.HEAD, app.VLM} and abs(sum(share.values()) - 1) < 1e-6
    table = app.gate_markdown(prediction, labels, predictor.config.gate_type)
    winner = labels[int(prediction["fused"].argmax())]
    assert f"| **{winner}** |" in table and all(f"| {label} |" in table or label == winner for label in labels)


def test_predictor_explains_from_the_same_vision_pass(app, predictor, tiny, monkeypatch):
    model, image_processor, _ = tiny
    monkeypatch.setattr(predictor, "max_new_tokens", 6)
    image = Image.new("RGB", (120, 90), (40, 60, 200))
    calls = []
    handle = predictor.model.vlm.model.visual.register_forward_hook(lambda *args: calls.append(1))
    try:
        plain, explained = predictor(image), predictor(image, explain_task="observation")
    finally:
        handle.remove()
    assert len(calls) == 2  # one vision pass each: the explanation reuses the classification's
    for key in ("fused", "vlm", "head", "logits"):
        assert torch.equal(plain[key], explained[key]), key
    assert "explanation" not in plain
    with torch.no_grad():
        expected = model.explain(**image_processor([image]), task="observation", max_new_tokens=6)[0]
    assert explained["explanation"] == expected
    assert explained["explanation_labels"] == model.config.labels_named_in(expected)
    assert explained["explanation_seconds"] > 0


def test_explanation_markdown_flags_disagreement(app):
    labels = ["negative", "neutral", "positive"]
    prediction = {"fused": torch.tensor([0.1, 0.7, 0.2]), "explanation_seconds": 0.25, "device": "CPU"}
    cases = {
        (): "The text names no class.",
        ("neutral",): "The text names **neutral**, the predicted class.",
        ("positive", "neutral"): "⚠️ The text names **positive**, **neutral**; the model predicts **neutral**.",
    }
    for named, expected in cases.items():
        text = app.explanation_markdown({**prediction, "explanation_labels": list(named)}, labels, "inference", 64)
        assert text.startswith(expected) and "not ground truth" in text and "at most 64 new tokens" in text, text


def test_explain_button_shows_progress_then_the_text_and_the_same_panels(app, predictor, tmp_path, monkeypatch):
    monkeypatch.setattr(predictor, "max_new_tokens", 6)
    demo = app.build_demo(predictor, "tiny")
    handlers = {function.api_name: function.fn for function in demo.fns.values()}
    image_path = tmp_path / "image.png"
    Image.new("RGB", (100, 70), (200, 40, 40)).save(image_path)
    classified = handlers["classify"](str(image_path))
    assert classified[-2:] == ("", "")  # a new classification clears an earlier explanation
    steps = list(handlers["explain"](str(image_path), "inference"))
    assert len(steps) == 2
    progress, final = steps
    assert all(isinstance(update, type(app.gr.skip())) for update in progress[:5]), progress  # panels untouched
    assert progress[5] == "" and "Generating its reasoning" in progress[6]
    # the scores, the gate's share and its table are the same (all but the table's last line: the time taken)
    assert final[:4] == classified[:4] and final[4].rsplit("\n\n", 1)[0] == classified[4].rsplit("\n\n", 1)[0]
    assert final[5] == predictor(str(image_path), explain_task="inference")["explanation"]
    assert "not ground truth" in final[6]
    with pytest.raises(app.gr.Error, match="Upload an image first"):
        next(handlers["explain"](None, "inference"))


def test_demo_passes_uploads_to_the_model_processor_undecoded(app, predictor):
    # Gradio's default image_mode="RGB" would drop transparency before the processor could composite it onto white,
    # and type="pil" would let Gradio decode the upload with every PIL plugin: the processor gets the file instead.
    demo = app.build_demo(predictor, "tiny")
    components = {block.elem_id: block for block in demo.blocks.values() if getattr(block, "elem_id", None)}
    assert {"image", "submit", "fused", "vlm-branch", "head-branch", "gate-share", "gate-table"} <= set(components)
    assert {"explain", "explain-task", "explanation", "explanation-status"} <= set(components)
    assert components["image"].image_mode is None and components["image"].type == "filepath"


def test_about_this_model_shows_the_calibration_and_the_reliability_diagram(app, predictor, tiny_folder, tmp_path):
    model_folder = tmp_path / "model"
    shutil.copytree(tiny_folder, model_folder)
    assert app.reliability_diagram(str(model_folder)) is None  # a repo exported without one: no diagram, no error
    Image.new("RGB", (90, 60), (250, 250, 250)).save(model_folder / "reliability_val_fused.png")
    diagram = app.reliability_diagram(str(model_folder))
    assert diagram == str(model_folder / "reliability_val_fused.png")
    predictor_with_diagram = copy.copy(predictor)
    predictor_with_diagram.reliability_diagram = diagram
    demo = app.build_demo(predictor_with_diagram, "tiny")
    components = {block.elem_id: block for block in demo.blocks.values() if getattr(block, "elem_id", None)}
    assert {"about", "about-calibration", "reliability"} <= set(components)
    assert "not calibrated" in components["about-calibration"].value
    config = copy.deepcopy(predictor.config)
    config.calibration_temperature = 2.5
    assert "`calibration_temperature` = 2.500" in app.about_markdown(config, diagram)
    assert predictor.reliability_diagram is None  # the tiny folder has none
    demo = app.build_demo(predictor, "tiny")
    assert "reliability" not in {getattr(block, "elem_id", None) for block in demo.blocks.values()}


def test_example_images_are_distinct_pictures(app, tmp_path):
    paths = app.make_example_images(tmp_path / "examples")
    assert len(paths) == 4
    pixels = set()
    for path in paths:
        with Image.open(path) as image:
            assert image.size == (224, 224) and image.mode == "RGB"
            pixels.add(image.tobytes())
    assert len(pixels) == 4


def test_model_resolution(app, tiny_folder, tmp_path, monkeypatch):
    monkeypatch.delenv(app.MODEL_ENV, raising=False)
    assert app.resolve_model("some-user/some-model") == ("some-user/some-model", False)
    monkeypatch.setenv(app.MODEL_ENV, str(tiny_folder))
    assert app.resolve_model(None) == (str(tiny_folder), False)
    monkeypatch.delenv(app.MODEL_ENV)

    # Exported into a model repo, in its space/ folder or at its root: the app serves that repo.
    repo = copy_model_repo(tiny_folder, tmp_path / "repo")
    shutil.copy(SPACE_APP, repo / "app.py")
    for app_path in (repo / "space" / "app.py", repo / "app.py"):
        assert load_module(app_path, "exported_app").resolve_model(None) == (str(repo), False)

    # No model anywhere: a tiny model when the package is installed, otherwise a clear exit.
    folder, tiny = app.resolve_model(None)
    assert tiny and (Path(folder) / "config.json").is_file() and (Path(folder) / "model.safetensors").is_file()
    shutil.rmtree(folder)
    monkeypatch.setitem(sys.modules, "emovlm_kd.tiny", None)  # importing it now raises ImportError
    with pytest.raises(SystemExit, match=f"No model given.*{app.MODEL_ENV}"):
        app.resolve_model(None)


def _requirements(path) -> set[str]:
    lines = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
    return {re.split(r"[<>=~!\[ ]", line)[0].lower() for line in lines}


def test_requirements_and_space_card():
    # torchvision: the image processor (Qwen2-VL's) needs it; no project package: only PyPI names.
    space, endpoint = _requirements(SPACE_REQUIREMENTS), _requirements(ENDPOINT_REQUIREMENTS)
    assert {"torch", "torchvision", "transformers", "pillow", "numpy", "gradio"} <= space
    assert {"torch", "torchvision", "transformers", "pillow"} <= endpoint
    assert not any("emovlm" in name for name in space | endpoint)
    card = SpaceCard.load(SPACE_DIR / "README.md")
    assert card.data.sdk == "gradio" and card.data.app_file == "app.py"


def test_examples_space_launcher_points_at_the_shipped_app():
    launcher = load_module(REPO_ROOT / "examples" / "space" / "app.py", "space_launcher")  # __main__ only launches
    assert launcher.SPACE_APP == SPACE_APP and SPACE_APP.is_file()


def check_prediction_panels(texts: dict[str, list[str]], labels: list[str], expected: str):
    """The Space's panels as read in the browser. Label components read: [title, headline class, then (class,
    percentage) per class]."""
    assert texts["fused"][:2] == ["Prediction (fused by the gate)", expected], texts["fused"]
    titles = {"fused": "Prediction (fused by the gate)", "vlm-branch": "VLM branch", "head-branch": "distilled head"}
    for name, title in titles.items():
        lines = texts[name]
        assert lines[0] == title and lines[1] in labels, lines
        assert sorted(lines[2::2]) == sorted(labels), lines
        assert all(value.endswith("%") for value in lines[3::2]), lines
    assert sorted(texts["gate-share"][2::2]) == ["VLM branch", "distilled head"]
    table = "\n".join(texts["gate-table"])
    assert f"prediction {expected}" in table and "concat_linear" in table
    assert all(label in table for label in labels)


@pytest.mark.slow
def test_space_in_headless_chromium(tiny, tiny_folder, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    # The app as exported into a model repo, run where only the PyPI packages are installed, with no arguments.
    repo = copy_model_repo(tiny_folder, tmp_path / "repo")
    launcher = tmp_path / "launch_space.py"
    run_app = f"import runpy\nrunpy.run_path({str(repo / 'space' / 'app.py')!r}, run_name='__main__')\n"
    launcher.write_text(BLOCK_PROJECT_MODULES + run_app)
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_SERVER_NAME": "127.0.0.1"}
    env.pop("EMOVLM_KD_MODEL", None)
    server = subprocess.Popen(
        [sys.executable, str(launcher), "--port", str(port), "--max-new-tokens", str(EXPLANATION_TOKENS)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    image_path = tmp_path / "upload.png"
    image = Image.new("RGBA", (120, 90), (220, 40, 40, 90))  # transparency: handled by the model's processor
    image.save(image_path)
    labels = tiny[0].config.labels
    expected = labels[int(fused_probabilities(tiny, image).argmax())]
    with torch.no_grad():
        expected_explanation = tiny[0].explain(**tiny[1]([str(image_path)]), max_new_tokens=EXPLANATION_TOKENS)[0]
    driver = None
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_for_server(url, server, timeout=90)
        driver = chromium(tempfile.mkdtemp(dir=tmp_path, prefix="chromium-profile-"))
        driver.set_page_load_timeout(30)
        wait = WebDriverWait(driver, 30)
        driver.get(url)
        upload = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#image input[type=file]"))
        upload.send_keys(str(image_path))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image img"))
        driver.find_element(By.ID, "submit").click()
        wait.until(lambda d: "fused logit" in d.find_element(By.ID, "gate-table").text)
        panels = ("fused", "vlm-branch", "head-branch", "gate-share", "gate-table")
        texts = {name: driver.find_element(By.ID, name).text.splitlines() for name in panels}
        assert not driver.find_element(By.CSS_SELECTOR, "#explanation textarea").get_attribute("value")

        driver.find_element(By.ID, "explain").click()  # generated only now
        wait.until(lambda d: "not ground truth" in d.find_element(By.ID, "explanation-status").text)
        explanation = driver.find_element(By.CSS_SELECTOR, "#explanation textarea").get_attribute("value")
        explanation_status = driver.find_element(By.ID, "explanation-status").text
        after_explain = {name: driver.find_element(By.ID, name).text.splitlines() for name in panels}
        driver.save_screenshot(str(tmp_path / "space.png"))
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()

    check_prediction_panels(texts, labels, expected)
    with Image.open(tmp_path / "space.png") as screenshot:
        assert screenshot.size[0] >= 1000
    # the explanation: the model's own greedy text for this image, verbatim, and the classes it names
    assert explanation == expected_explanation, (explanation, expected_explanation)
    named = tiny[0].config.labels_named_in(explanation)
    assert ("The text names no class." in explanation_status) == (not named), explanation_status
    # the prediction panels and the gate table did not change (all but the table's last line, the time taken)
    assert {name: lines for name, lines in after_explain.items() if name != "gate-table"} == {
        name: lines for name, lines in texts.items() if name != "gate-table"
    }
    assert after_explain["gate-table"][:-1] == texts["gate-table"][:-1]
