"""The page of `detect-waste-cls app`: upload a photo of one waste object, see its top-5 classes.

Started by `detect_waste_cls.app.launch()` as `streamlit run streamlit_app.py ... -- --model PATH`.
"""

from __future__ import annotations

import sys

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from detect_waste_cls.app import (DEFAULT_THRESHOLD, IMAGE_TYPES, MAX_PIXELS, MAX_UPLOAD_MB, TOP_K, find_models,
                                  read_upload, script_model_argument, top_k)
from detect_waste_cls.errors import UserInputError
from detect_waste_cls.export import load_model, model_metrics
from detect_waste_cls.models.inference import describe_calibration

METRIC_NAMES = {"accuracy": "Accuracy", "balanced_accuracy": "Balanced accuracy", "macro_f1": "Macro F1",
                "ece": "ECE (calibrated)"}


@st.cache_resource(show_spinner="Loading the model...")
def cached_model(path: str):
    return load_model(path)


def top_k_figure(rows: list[tuple[str, float]]) -> go.Figure:
    names, confidences = zip(*rows)
    figure = go.Figure(go.Bar(x=confidences, y=names, orientation="h", text=[f"{c:.1%}" for c in confidences],
                              textposition="auto", marker_color=["#2e7d32"] + ["#90a4ae"] * (len(rows) - 1)))
    figure.update_layout(xaxis={"range": [0, 1.02], "dtick": 0.25, "tickformat": ".0%", "title": "confidence"},
                         yaxis={"autorange": "reversed"}, height=60 + 40 * len(rows),
                         margin={"l": 10, "r": 10, "t": 10, "b": 40})
    return figure


def model_panel(model, metrics: dict | None) -> None:
    st.sidebar.subheader("Model")
    st.sidebar.write(f"{len(model.classes)} classes: " + ", ".join(model.classes))
    if metrics is None:
        st.sidebar.caption("No test metrics for this model.")
        return
    st.sidebar.caption(f"Test metrics on {metrics['num_images']} images")
    for key, label in METRIC_NAMES.items():
        if key in metrics:
            st.sidebar.metric(label, f"{metrics[key]:.3f}")
    table = pd.DataFrame(metrics["per_class"]).T[["precision", "recall", "f1"]]
    table.columns = ["prec.", "recall", "F1"]  # narrow enough for the sidebar
    st.sidebar.dataframe(table.style.format("{:.2f}"))


st.set_page_config(page_title="detect-waste-cls", layout="centered")
st.title("Waste classifier")

try:
    choices = find_models(script_model_argument(sys.argv[1:]))
    choice = choices[0]
    if len(choices) > 1:
        choice = st.sidebar.selectbox("Run", choices, format_func=lambda c: c.label)
    model = cached_model(str(choice.path))
    metrics = model_metrics(choice.path)
except UserInputError as error:
    st.error(str(error))
    st.stop()
model_panel(model, metrics)

left, right = st.columns(2)
flip_tta = left.checkbox("Flip test-time augmentation", help="average the photo's and its mirror image's predictions")
threshold = right.slider("Confidence threshold", 0.0, 1.0, DEFAULT_THRESHOLD, 0.05,
                         help="a warning shows when the top-1 confidence is below this")
upload = st.file_uploader(f"Photo of one waste object (up to {MAX_UPLOAD_MB} MB and {MAX_PIXELS / 1e6:.0f} megapixels)",
                          type=list(IMAGE_TYPES), max_upload_size=MAX_UPLOAD_MB)
if upload is None:
    st.info("Upload a photo to classify it.")
    st.stop()

try:
    image = read_upload(upload.getvalue(), upload.name)
except UserInputError as error:
    st.error(str(error))
    st.stop()

rows = top_k(model.predict_images([image], flip_tta=flip_tta)[0].numpy(), model.classes, TOP_K)
name, confidence = rows[0]
photo, result = st.columns(2)
photo.image(image, caption=upload.name, width="stretch")
result.subheader(f"Top-1: {name} ({confidence:.1%})")
result.caption(f"Confidence {describe_calibration(model.calibration)}"
               + ("; averaged with the mirror image" if flip_tta else ""))
if confidence < threshold:
    result.warning(f"Low confidence: {confidence:.1%} is below the {threshold:.0%} threshold. "
                   "Check this photo by hand.")
result.plotly_chart(top_k_figure(rows), width="stretch", config={"displayModeBar": False})
