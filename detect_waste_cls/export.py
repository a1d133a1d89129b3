"""A checkpoint as a shippable Hugging Face-style folder (config.json, model.safetensors, README.md model card,
optionally model.onnx), `load_pretrained` to get it back, and `load_model` for either form."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save_model as save_safetensors

from detect_waste_cls import __version__
from detect_waste_cls.config import RECORD_KEY
from detect_waste_cls.data.crops import GEOMETRY_KEY
from detect_waste_cls.errors import UserInputError, check_new_folder
from detect_waste_cls.models.backbones import in_our_names
from detect_waste_cls.models.inference import TrainedClassifier, describe_calibration, load_checkpoint
from detect_waste_cls.output_folder import new_output_folder
from detect_waste_cls.run_folder import run_checkpoint

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
ONNX_FILE = "model.onnx"
CARD_FILE = "README.md"
METRICS_FILE = "metrics.json"  # the run's test metrics, copied so the app can show them
ONNX_TOLERANCE = 1e-4


def is_exported_folder(path: str | Path) -> bool:
    path = Path(path)
    return (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


@dataclass(frozen=True)
class ModelChoice:
    label: str  # what the app's run selectbox shows
    path: Path  # a checkpoint file or an exported folder: what load_model() and model_metrics() take


def find_models(path: Path) -> list[ModelChoice]:
    """The models `path` offers, most recent first.

    A .ckpt file or an exported folder is one model; so is a run folder (its checkpoints/ are searched);
    a folder of runs offers each subfolder that is an exported folder or a run folder.
    """
    path = Path(path)
    if path.is_file() or is_exported_folder(path):
        return [ModelChoice(path.name, path)]
    if not path.is_dir():
        raise UserInputError(f"model not found: {path} (give an exported folder, a .ckpt file or a folder of runs)")
    if (checkpoint := run_checkpoint(path)) is not None:
        return [ModelChoice(f"{path.name} ({checkpoint.name})", checkpoint)]
    choices = []
    for folder in (child for child in path.iterdir() if child.is_dir()):
        if is_exported_folder(folder):
            choices.append(ModelChoice(folder.name, folder))
        elif (checkpoint := run_checkpoint(folder)) is not None:
            choices.append(ModelChoice(f"{folder.name} ({checkpoint.name})", checkpoint))
    if not choices:
        raise UserInputError(f"{path} holds no model: no .ckpt file under checkpoints/ and no exported folder, "
                             "in it or in its subfolders")
    return sorted(choices, key=lambda choice: choice.path.stat().st_mtime, reverse=True)


def one_model(path: str | Path) -> Path:
    """The checkpoint file or exported folder a model path names: itself, or a run folder's final checkpoint."""
    choices = find_models(Path(path))
    if len(choices) > 1:
        raise UserInputError(f"{path} holds {len(choices)} models ({', '.join(c.label for c in choices[:3])}, ...): "
                             "give one run folder, checkpoint or exported folder")
    return choices[0].path


def load_model(path: str | Path, classes: Sequence[str] | None = None, classes_of: str = "the data") -> TrainedClassifier:
    """A ready-to-predict model from a checkpoint file, an exported folder or a run folder, in eval mode and the
    channels-last layout; Lightning is not imported.

    With `classes`, the model must know exactly those, in that order (`classes_of` names where they come from).
    """
    path = one_model(path)
    model = load_pretrained(path) if path.is_dir() else load_checkpoint(path)
    if classes is not None and model.classes != list(classes):
        raise UserInputError(f"{path} was trained on classes {model.classes}, but {classes_of} has {list(classes)}")
    # The same predictions, 1.5-1.7x faster on a CPU (benchmarks/results/channels_last-cpu.md).
    return model.to(memory_format=torch.channels_last)


def load_pretrained(folder: str | Path) -> TrainedClassifier:
    """The model of an exported folder, in eval mode, with its eval transform (`eval_view()`) and temperature."""
    folder = Path(folder)
    if not is_exported_folder(folder):
        raise UserInputError(f"{folder} is not an exported model folder: it needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
        # Folders exported before the calibration record have only the temperature.
        calibration = config.get("calibration") or {"temperature": float(config.get("temperature", 1.0))}
        model = TrainedClassifier(config["model"], config["classes"], config["image_size"], calibration)
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise UserInputError(f"{folder / CONFIG_FILE} is not a detect-waste-cls model config: {error!r}") from None
    weights = in_our_names(config["model"], load_file(folder / WEIGHTS_FILE), model.model)  # older exports too
    model.model.load_state_dict(weights)
    return model.eval()


def read_run_file(checkpoint: Path, name: str) -> dict | None:
    """A JSON file of the run a checkpoint belongs to (<run>/checkpoints/x.ckpt -> <run>/<name>), if it is there."""
    path = checkpoint.resolve().parent.parent / name
    return json.loads(path.read_text()) if path.is_file() else None


def model_metrics(path: str | Path) -> dict | None:
    """Test metrics for a checkpoint (its run's metrics.json) or an exported folder (its copy), if there are any."""
    path = Path(path)
    if path.is_dir():
        return json.loads((path / METRICS_FILE).read_text()) if (path / METRICS_FILE).is_file() else None
    return read_run_file(path, METRICS_FILE)


def export_model(checkpoint: str | Path, out: str | Path, *, onnx: bool = False, push_to_hub: str | None = None) -> Path:
    """Write config.json, model.safetensors, README.md (and model.onnx) into a new folder; optionally upload it.

    `checkpoint`: a .ckpt file or a run folder. Everything the export needs is checked before it writes, and the
    folder appears whole or not at all. A failed upload keeps it, for a later one.
    """
    checkpoint, out = one_model(checkpoint), check_new_folder(Path(out))
    if checkpoint.is_dir():
        raise UserInputError(f"{checkpoint} is an exported folder already: export takes a .ckpt file or a run folder")
    if onnx:
        require_onnx()
    if push_to_hub:
        require_hub_token()
    model = load_checkpoint(checkpoint)
    metrics, training = read_run_file(checkpoint, METRICS_FILE), read_run_file(checkpoint, CONFIG_FILE)
    config = {
        "library": "detect-waste-cls",
        "version": __version__,
        "model": model.model_name,
        "classes": model.classes,
        "image_size": model.image_size,
        "normalization": {"mean": list(model.normalization[0]), "std": list(model.normalization[1])},
        "temperature": model.temperature,
        "calibration": model.calibration,  # the validation images the temperature was fitted on, or why it is 1
        "input": "RGB, resized to image_size x image_size, scaled to [0, 1], then (x - mean) / std",
    }
    if (crop_geometry := (training or {}).get(RECORD_KEY, {}).get(GEOMETRY_KEY)) is not None:
        config[GEOMETRY_KEY] = crop_geometry  # what `predict --boxes` cuts a detector's boxes with
    if onnx:
        config["onnx_output"] = "logits already divided by temperature: softmax gives calibrated probabilities"
    with new_output_folder(out) as folder:
        write_weights_and_config(model, config, folder)
        if metrics is not None:
            (folder / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
        (folder / CARD_FILE).write_text(model_card(config, metrics, training, model.backbone_entry.timm_name))
        if onnx:
            export_onnx(model, folder / ONNX_FILE)
    log.info("exported %s to %s", checkpoint, out)
    if push_to_hub:
        upload_folder(out, push_to_hub)
    return out


class CalibratedLogits(torch.nn.Module):
    """What model.onnx computes: logits / temperature."""

    def __init__(self, model: TrainedClassifier):
        super().__init__()
        self.model, self.temperature = model.model, model.temperature

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images) / self.temperature


def write_weights_and_config(model: TrainedClassifier, config: dict, out: Path) -> None:
    """config.json and model.safetensors. A model timm builds gets timm's own format (what `save_for_hf` writes,
    so `timm.create_model("local-dir:OUT", pretrained=True)` loads it, label_names set), our keys beside timm's."""
    timm_name = model.backbone_entry.timm_name
    if timm_name is None:  # torchvision, efficientnet-pytorch, the small CNN: timm cannot build these
        (out / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        save_safetensors(model.model, str(out / WEIGHTS_FILE))
        return
    from timm.models._hub import save_for_hf

    mean, std = model.normalization
    # Our eval transform: a plain resize to image_size (no crop), then (x - mean) / std.
    data_config = {"input_size": (3, model.image_size, model.image_size), "mean": mean, "std": std, "crop_pct": 1.0,
                   "interpolation": model.backbone_entry.interpolation}
    save_for_hf(model.model, out, model_config={"label_names": model.classes, **config}, safe_serialization=True,
                data_config=data_config)


def require_onnx() -> None:
    try:
        import onnx  # noqa: F401  (torch.onnx.export writes through it)
        import onnxruntime  # noqa: F401  (the check against PyTorch)
    except ImportError:
        raise UserInputError("--onnx needs the onnx and onnxruntime packages: pip install 'detect-waste-cls[onnx]'") from None


def require_hub_token() -> None:
    from huggingface_hub import get_token  # its own lookup: $HF_TOKEN, then the token `hf auth login` saved

    if get_token() is None:
        raise UserInputError("--push-to-hub needs a Hugging Face token: set $HF_TOKEN or run `hf auth login`")


def export_onnx(model: TrainedClassifier, path: Path) -> Path:
    """model.onnx with a dynamic batch size, checked against PyTorch with onnxruntime on a batch of 2."""
    import onnxruntime  # export_model checked it is there (require_onnx) before writing anything

    wrapped = CalibratedLogits(model).eval()
    example = torch.randn(2, 3, model.image_size, model.image_size)
    torch.onnx.export(
        wrapped, (example,), str(path), input_names=["images"], output_names=["logits"],
        dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False,
    )
    with torch.inference_mode():
        expected = wrapped(example).numpy()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"images": example.numpy()})[0]
    difference = float(abs(got - expected).max())
    if difference > ONNX_TOLERANCE:
        raise RuntimeError(f"{path}: onnxruntime differs from PyTorch by {difference:.2e} (> {ONNX_TOLERANCE})")
    return path


def model_card(config: dict, metrics: dict | None, training: dict | None, timm_name: str | None = None) -> str:
    """README.md of an exported folder (the Hugging Face model-card layout): what the model is, how well it did,
    what it is for and not for."""
    classes = ", ".join(config["classes"])
    if timm_name:
        loading = ["", "timm loads this folder as it is (architecture " f"`{timm_name}`, `label_names` = the classes):",
                   "```python", "import timm",
                   "model = timm.create_model(\"local-dir:THIS_FOLDER\", pretrained=True).eval()", "```"]
    else:
        loading = ["", f"The folder is in detect-waste-cls's own format: timm cannot build `{config['model']}`."]
    lines = [
        "---",
        f"library_name: {'timm' if timm_name else 'detect-waste-cls'}",
        "pipeline_tag: image-classification",
        "tags: [image-classification, waste, recycling, litter]",
        "---",
        f"# {config['model']} waste classifier",
        "",
        f"Classifies a photo of one waste object into one of {len(config['classes'])} classes: {classes}.",
        f"Input: RGB, {config['image_size']} x {config['image_size']} px, normalized with mean "
        f"{config['normalization']['mean']} and std {config['normalization']['std']}. "
        f"Confidences are {describe_calibration(config['calibration'])}.",
        "",
        "## Use",
        "```python",
        "from detect_waste_cls import load_pretrained",
        "model = load_pretrained(\"THIS_FOLDER\")",
        "probabilities = model.predict_images([rgb_uint8_array])",
        "```",
        "or `detect-waste-cls predict --checkpoint THIS_FOLDER --images PHOTOS --out predictions.csv`, or "
        "`detect-waste-cls app --model THIS_FOLDER`.",
        *loading,
        "",
        "## Test metrics",
    ]
    if metrics is None:
        lines.append("The run had no test split: no metrics.")
    else:
        lines += [
            f"{metrics['num_images']} test images.",
            "",
            "| metric | value |",
            "|---|---|",
            *(f"| {name} | {metrics[name]:.4f} |" for name in
              ("accuracy", "balanced_accuracy", "macro_f1", "ece_uncalibrated", "ece") if name in metrics),
            "",
            "| class | precision | recall | F1 | test images |",
            "|---|---|---|---|---|",
            *(f"| {name} | {row['precision']:.4f} | {row['recall']:.4f} | {row['f1']:.4f} | {row['support']} |"
              for name, row in metrics["per_class"].items()),
        ]
    lines += ["", "## Training data"]
    if training is None:
        lines.append("Unknown: the run's config.json was not found next to the checkpoint.")
    else:
        data, pseudo, optim = training["data"], training["pseudo"], training["optim"]
        lines.append(
            f"Trained by detect-waste-cls {config['version']} on `{data['root']}` ({data['image_size']} px, "
            f"{optim['epochs']} epochs, fine-tuning {optim['finetune']}, pseudo-labeling {pseudo['mode']}); "
            f"the run's full config is replayable with `--config`.")
    if GEOMETRY_KEY in config:
        geometry = config[GEOMETRY_KEY]
        lines.append(f"Its images were crops of boxes (square {geometry['square']}, zoom {geometry['zoom']:g}); "
                     "`detect-waste-cls predict --boxes` cuts a detector's boxes the same way.")
    lines += [
        "",
        "## Intended use and limits",
        "- Sorting aids and litter surveys: one object per photo, roughly centred, in the classes above.",
        "- Every photo gets one of these classes: an object of another kind, or several objects, get a wrong "
        "answer with a possibly high confidence. Check low-confidence predictions by hand.",
        "- The metrics hold for images like the test split; other cameras, lighting or backgrounds can do worse. "
        "Measure on your own labeled sample (`detect-waste-cls test`) before relying on it.",
        "- Not for safety-critical decisions (hazardous or medical waste).",
        "",
    ]
    return "\n".join(lines)


def upload_folder(folder: Path, repo_id: str) -> str:
    """Upload an exported folder to the Hugging Face Hub (token: see require_hub_token); network or auth trouble
    is one line."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, exist_ok=True)
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id)
    # Any failure of these two calls: huggingface_hub's HTTP errors, and its HTTP client's connection errors,
    # whose classes change with its versions (requests, httpx, httpx2).
    except Exception as error:  # noqa: BLE001
        raise UserInputError(f"could not push {folder} to the Hugging Face Hub as {repo_id}: "
                             f"{type(error).__name__}: {str(error).splitlines()[0]}") from None
    log.info("pushed %s to %s", folder, commit)
    return str(commit)
