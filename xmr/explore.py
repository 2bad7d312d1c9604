"""An interactive retrieval explorer for JupyterLab: type a caption or pick an image, see a trained model's top
results with the ground truth marked.

The search itself (:meth:`RetrievalExplorer.search_text`, :meth:`RetrievalExplorer.search_image`) is plain
Python, so it is tested without a browser; :meth:`RetrievalExplorer.widget` wraps it in ipywidgets.
"""

from __future__ import annotations

from dataclasses import dataclass

import matplotlib.pyplot as plt
import torch

from .data import CaptionInputs, ImageCaptionSplit
from .encoders import DualEncoder
from .experiment import DualEncoderSettings, encode_new_captions
from .plots import show_image_to_text, show_text_to_image, top_k_indices
from .train import encode


@dataclass
class TrainedModel:
    """A trained dual encoder with the settings that say which inputs its towers read."""

    model: DualEncoder
    settings: DualEncoderSettings


class RetrievalExplorer:
    """Text-to-image and image-to-text search over one split with one or more trained models.

    ``models`` maps a display name to a :class:`TrainedModel`; ``inputs`` are the split's cached inputs (as
    :func:`xmr.features.load_caption_inputs` returns them for those models' settings). The gallery of every
    model is embedded once, on first use.
    """

    def __init__(self, models: dict[str, TrainedModel], split: ImageCaptionSplit, inputs: CaptionInputs,
                 top_k: int = 5):
        if not models:
            raise ValueError("give at least one trained model to explore")
        if inputs.image.shape[0] != len(split) or inputs.text.shape[0] != len(split.captions):
            raise ValueError(f"inputs hold {inputs.image.shape[0]} images / {inputs.text.shape[0]} captions but the "
                             f"split has {len(split)} / {len(split.captions)}: load both for the same split and size")
        self.models, self.split, self.inputs, self.top_k = models, split, inputs, top_k
        self._galleries: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def gallery(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(image embeddings (N, D), caption embeddings (5N, D)) of the split under model ``name``."""
        if name not in self.models:
            raise KeyError(f"unknown model {name!r}; have {sorted(self.models)}")
        if name not in self._galleries:
            model = self.models[name].model.eval()
            device = next(model.parameters()).device
            self._galleries[name] = (encode(model.encode_image, self.inputs.image, device=device).cpu(),
                                     encode(model.encode_text, self.inputs.text, self.inputs.text_mask,
                                            device=device).cpu())
        return self._galleries[name]

    def search_text(self, name: str, query: str) -> list[int]:
        """Image indices ranked for a free-text ``query``, best first (top_k of them)."""
        if not query.strip():
            raise ValueError("type a caption to search for")
        trained = self.models[name]
        query_embedding = encode_new_captions(trained.model, trained.settings, [query]).cpu()  # (1, D)
        images, _ = self.gallery(name)
        return top_k_indices((images @ query_embedding.T).squeeze(1), self.top_k)

    def search_image(self, name: str, image_index: int) -> list[int]:
        """Caption indices ranked for image ``image_index`` of the split, best first (top_k of them)."""
        if not 0 <= image_index < len(self.split):
            raise IndexError(f"image index {image_index} outside 0..{len(self.split) - 1}")
        images, captions = self.gallery(name)
        return top_k_indices(captions @ images[image_index], self.top_k)

    def true_images(self, query: str) -> list[int]:
        """Images of the split that have ``query`` (exactly) as one of their captions."""
        return sorted({index // self.split.captions_per_image for index, caption in enumerate(self.split.captions)
                       if caption.strip().lower() == query.strip().lower()})

    def true_captions(self, image_index: int) -> list[int]:
        per_image = self.split.captions_per_image
        return list(range(image_index * per_image, (image_index + 1) * per_image))

    def show_text_query(self, name: str, query: str):
        return show_text_to_image(query, self.split.image_paths, self.search_text(name, query),
                                  self.true_images(query), self.top_k)

    def show_image_query(self, name: str, image_index: int):
        return show_image_to_text(self.split.image_paths[image_index], self.split.captions,
                                  self.search_image(name, image_index), self.true_captions(image_index), self.top_k)

    def widget(self, query: str = "", image_index: int = 0):
        """The explorer as ipywidgets: a model chooser, a caption box and an image picker over one output area."""
        import ipywidgets as widgets
        from IPython.display import display

        model_choice = widgets.Dropdown(options=list(self.models), description="model")
        caption_box = widgets.Text(value=query or self.split.captions[0], description="caption",
                                   layout=widgets.Layout(width="70%"), continuous_update=False)
        text_button = widgets.Button(description="find images", icon="search")
        image_picker = widgets.BoundedIntText(value=image_index, min=0, max=len(self.split) - 1,
                                              description="image #")
        image_button = widgets.Button(description="find captions", icon="search")
        output = widgets.Output()

        def show(figure_of) -> None:
            output.clear_output(wait=True)
            with output:
                try:
                    figure = figure_of()
                except (ValueError, IndexError) as error:
                    print(f"{error}")
                    return
                display(figure)
                plt.close(figure)

        text_button.on_click(lambda _: show(lambda: self.show_text_query(model_choice.value, caption_box.value)))
        caption_box.observe(lambda _: text_button.click(), names="value")
        image_button.on_click(lambda _: show(lambda: self.show_image_query(model_choice.value, image_picker.value)))
        text_button.click()  # the first view, saved with the notebook
        return widgets.VBox([model_choice, widgets.HBox([caption_box, text_button]),
                             widgets.HBox([image_picker, image_button]), output])
