"""Extra Networks cards under the prompt (A1111's "Extra Networks" / Civitai helper habit).

LoRAs, embeddings and checkpoints as cards: preview picture (``<name>.preview.png`` beside the file,
as A1111 and the Civitai helpers write it, else a placeholder), name, family, hash and trained
words. Clicking a LoRA card inserts ``<lora:name:1>`` at the prompt's cursor, an embedding card its
name; a checkpoint card selects that checkpoint. A LoRA made for another family than the chosen
checkpoint is marked as such, before anyone wastes a generation on it.
"""

from __future__ import annotations

import base64
import html
import io
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr

if TYPE_CHECKING:
    from app.services import StudioServices

PREVIEW_SUFFIXES = (".preview.png", ".preview.jpg", ".preview.jpeg", ".preview.webp", ".png", ".jpg")
PREVIEW_SIDE = 160
TRAINED_WORDS_SHOWN = 6

# Inserts the card's text at the prompt's cursor (or selection) and tells Gradio the value changed.
_INSERT_JS = (
    "(function(card){{const box=document.querySelector('#{prefix}_prompt textarea');if(!box)return;"
    "const text=card.dataset.insert;const start=box.selectionStart??box.value.length;"
    "const end=box.selectionEnd??start;const before=box.value.slice(0,start);"
    "const after=box.value.slice(end);const gap=before&&!/\\s$/.test(before)?' ':'';"
    "box.value=before+gap+text+after;const at=(before+gap+text).length;"
    "box.dispatchEvent(new Event('input',{{bubbles:true}}));box.focus();"
    "box.setSelectionRange(at,at);}})(this)"
)
# Hands the clicked checkpoint card's name to the hidden ``{prefix}_checkpoint_pick`` box; the
# timestamp makes a second click on the same card an event too. Python then sets the tab's
# checkpoint dropdown, the same switch a user makes by hand (the next job loads that model).
_PICK_CHECKPOINT_JS = (
    "(function(card){{const box=document.querySelector('#{prefix}_checkpoint_pick textarea, "
    "#{prefix}_checkpoint_pick input');if(!box)return;box.value=card.dataset.name+'\\n'+Date.now();"
    "box.dispatchEvent(new Event('input',{{bubbles:true}}));}})(this)"
)


@dataclass(frozen=True)
class Card:
    kind: str  # "lora", "embedding", "checkpoint"
    name: str
    family: str
    hash: str
    words: tuple[str, ...]
    preview: str | None  # data: URL of a small preview picture
    insert: str  # what a click puts in the prompt ("" for checkpoints)
    mismatch: str = ""  # why it does not fit the chosen checkpoint


class CardCatalogue:
    """Reads cards from the model folders; hashes and previews are cached per file version."""

    def __init__(self, services: StudioServices) -> None:
        self.services = services
        self._cache: dict[tuple[str, int, float], tuple[str, str, tuple[str, ...], str | None]] = {}
        self._lock = threading.Lock()

    def _describe_lora(self, path: Path) -> tuple[str, str, tuple[str, ...], str | None]:
        from pipelines.prompts.extra_networks import (
            lora_family_label,
            lora_file_hash,
            read_safetensors_metadata,
        )

        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        metadata = read_safetensors_metadata(path) if path.suffix.lower() == ".safetensors" else {}
        stored = metadata.get("sshs_model_hash")
        digest = str(stored) if isinstance(stored, str) and stored else lora_file_hash(path)
        value = (lora_family_label(path), digest[:12], trained_words(path, metadata), preview_data_url(path))
        with self._lock:
            self._cache[key] = value
        return value

    def cards(self, checkpoint: str | None) -> list[Card]:
        from pipelines.prompts.extra_networks import EMBEDDING_SUFFIXES, LORA_SUFFIXES, list_loras

        registry = self.services.registry
        chosen_family = checkpoint_family(self.services, checkpoint)
        found: list[Card] = []
        for entry in list_loras(registry.paths.folder("lora")):
            path = Path(entry["path"])
            if path.suffix.lower() not in LORA_SUFFIXES:
                continue
            try:
                family, digest, words, preview = self._describe_lora(path)
            except OSError:
                continue
            mismatch = ""
            if chosen_family and family not in ("unknown", chosen_family) and not family.startswith("a"):
                mismatch = f"made for {family}; the chosen checkpoint is {chosen_family}"
            found.append(
                Card("lora", path.stem, family, digest, words, preview, f"<lora:{path.stem}:1>", mismatch)
            )
        embeddings = registry.paths.folder("embedding")
        if embeddings.is_dir():
            for path in sorted(embeddings.rglob("*")):
                if path.is_file() and path.suffix.lower() in EMBEDDING_SUFFIXES:
                    found.append(Card("embedding", path.stem, "", "", (), preview_data_url(path), path.stem))
        for entry in registry.checkpoints():
            described = registry.describe(entry)
            found.append(
                Card(
                    "checkpoint",
                    entry.name,
                    str(described.get("family", "")),
                    str(described.get("hash") or ""),
                    (),
                    preview_data_url(entry.path),
                    "",
                )
            )
        return found


def checkpoint_family(services: StudioServices, checkpoint: str | None) -> str:
    """The base family label ("SD1.x", "SDXL"...) of the chosen checkpoint; "" when unknown."""
    registry = services.registry
    try:
        entry = registry.find("checkpoint", checkpoint) if checkpoint else registry.default_checkpoint()
        return registry.family(entry).label.split(" ")[0]
    except Exception:  # no checkpoint yet, or one whose family cannot be told: no marking
        return ""


def trained_words(path: Path, metadata: dict[str, Any]) -> tuple[str, ...]:
    """The words a LoRA was trained on: a Civitai-helper/A1111 ``<name>.json`` "activation text",
    else the safetensors metadata's trigger phrase, else its most frequent training tags."""
    sidecar = path.with_suffix(".json")
    if sidecar.is_file():
        try:
            text = json.loads(sidecar.read_text(encoding="utf-8")).get("activation text", "")
        except (OSError, ValueError, AttributeError):
            text = ""
        if text:
            return tuple(word.strip() for word in str(text).split(",") if word.strip())
    phrase = metadata.get("modelspec.trigger_phrase")
    if isinstance(phrase, str) and phrase.strip():
        return tuple(word.strip() for word in phrase.split(",") if word.strip())
    frequencies = metadata.get("ss_tag_frequency")
    counts: dict[str, int] = {}
    if isinstance(frequencies, dict):
        for tags in frequencies.values():
            if isinstance(tags, dict):
                for tag, count in tags.items():
                    counts[str(tag).strip()] = counts.get(str(tag).strip(), 0) + int(count or 0)
    ranked = sorted(counts, key=lambda tag: -counts[tag])
    return tuple(tag for tag in ranked if tag)[:TRAINED_WORDS_SHOWN]


def preview_data_url(path: Path) -> str | None:
    """A small copy of ``<name>.preview.png`` (or ``<name>.png``...) beside the file, inlined so the
    page needs no access to the models folder; None when there is none."""
    from PIL import Image, UnidentifiedImageError

    stem = path.with_suffix("")
    for suffix in PREVIEW_SUFFIXES:
        candidate = Path(f"{stem}{suffix}")
        if not candidate.is_file():
            continue
        try:
            with Image.open(candidate) as image:
                small = image.convert("RGB")
        except (OSError, UnidentifiedImageError):
            continue
        small.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
        buffer = io.BytesIO()
        small.save(buffer, format="JPEG", quality=80)
        return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    return None


def cards_html(cards: list[Card], prefix: str, kind: str, search: str = "", selected: str = "") -> str:
    """The cards of one kind as HTML (every text escaped: names come from files); ``selected`` is
    the tab's checkpoint, whose card is marked so the artist sees which one is in use."""
    words = search.lower().split()
    shown = [
        card
        for card in cards
        if card.kind == kind
        and all(w in f"{card.name} {card.family} {' '.join(card.words)}".lower() for w in words)
    ]
    if not shown:
        folder = {"lora": "models/Lora", "embedding": "embeddings", "checkpoint": "models/Stable-diffusion"}[
            kind
        ]
        what = "match the search" if words else f"are in {folder}"
        return f'<p class="sd-cards-empty">No {kind}s {what}.</p>'
    insert = html.escape(_INSERT_JS.format(prefix=prefix), quote=True)
    pick = html.escape(_PICK_CHECKPOINT_JS.format(prefix=prefix), quote=True)
    parts = ['<div class="sd-cards" style="display:flex;flex-wrap:wrap;gap:8px">']
    for card in shown:
        picture = (
            f'<img src="{card.preview}" alt="" style="width:100%;height:120px;object-fit:cover">'
            if card.preview
            else '<div style="height:120px;display:flex;align-items:center;justify-content:center;'
            f'background:#8883;font-size:40px" aria-hidden="true">{html.escape(card.name[:1].upper())}</div>'
        )
        details = " · ".join(part for part in (card.family, f"[{card.hash}]" if card.hash else "") if part)
        trained = (
            '<div class="sd-card-words" style="font-size:11px">'
            f"trained: {html.escape(', '.join(card.words))}</div>"
            if card.words
            else ""
        )
        warning = (
            '<div class="sd-card-mismatch" style="color:#dc2626;font-size:11px">'
            f"⚠ {html.escape(card.mismatch)}</div>"
            if card.mismatch
            else ""
        )
        chosen = card.kind == "checkpoint" and bool(selected) and _same_checkpoint(card.name, selected)
        border = "#dc2626" if card.mismatch else ("#f97316" if chosen else "#8886")
        if card.insert:
            click = f' onclick="{insert}" data-insert="{html.escape(card.insert, quote=True)}"'
            title = f"Click to add {card.insert} to the prompt"
        elif card.kind == "checkpoint":
            click = f' onclick="{pick}"'
            title = f"{card.name}: in use" if chosen else f"Click to use {card.name}"
        else:
            click, title = "", card.name
        title = html.escape(title, quote=True)
        if chosen:
            warning += '<div class="sd-card-in-use" style="font-size:11px;font-weight:600">✓ in use</div>'
        selected_class = " sd-card-selected" if chosen else ""
        parts.append(
            f'<div class="sd-card sd-card-{card.kind}{selected_class}" '
            f'data-name="{html.escape(card.name, quote=True)}"'
            f'{click} title="{title}" role="button" tabindex="0" style="width:160px;cursor:pointer;'
            f"border:{2 if chosen else 1}px solid {border};border-radius:6px;overflow:hidden;"
            'padding-bottom:4px">'
            f'{picture}<div style="padding:2px 6px"><b>{html.escape(card.name)}</b>'
            f'<div style="font-size:11px">{html.escape(details)}</div>{trained}{warning}</div></div>'
        )
    parts.append("</div>")
    return "".join(parts)


def _same_checkpoint(card_name: str, chosen: str) -> bool:
    """A card is named by the file's stem ("tiny-sd1"), the dropdown by its file name
    ("tiny-sd1.safetensors", or a diffusers folder's name)."""
    return chosen == card_name or Path(chosen).stem == card_name or Path(chosen).name == card_name


def picked_checkpoint(services: StudioServices, picked: str, current: str | None) -> Any:
    """The dropdown update for a clicked checkpoint card: the checkpoint's file name as the dropdown
    lists it; the current value when the name no longer matches a file (deleted since the cards
    were drawn), with a warning instead of a failing job later."""
    from pipelines.errors import ModelNotFoundError

    name = picked.split("\n", 1)[0].strip()
    if not name:
        return gr.update()
    try:
        entry = services.registry.find("checkpoint", name)
    except ModelNotFoundError:
        gr.Warning(f"Checkpoint '{name}' is no longer in the models folder; press Refresh cards.")
        return gr.update(value=current)
    return gr.update(value=entry.filename)


@dataclass
class ExtraNetworksPanel:
    loras: Any
    embeddings: Any
    checkpoints: Any
    checkpoint_pick: Any


def build(services: StudioServices, prefix: str, checkpoint: Any) -> ExtraNetworksPanel:
    """Render the cards accordion (inside the caller's column); ``checkpoint`` is the tab's
    checkpoint dropdown, against which LoRA families are checked."""
    catalogue = CardCatalogue(services)
    with gr.Accordion(
        "Extra Networks: LoRA, embeddings, checkpoints", open=False, elem_id=f"{prefix}_networks"
    ) as accordion:
        with gr.Row(equal_height=True):
            search = gr.Textbox(
                label="Search cards",
                placeholder="name, family or trained word",
                elem_id=f"{prefix}_networks_search",
            )
            refresh = gr.Button(
                "🔄 Refresh cards", size="sm", scale=0, min_width=150, elem_id=f"{prefix}_networks_refresh"
            )
        with gr.Tabs():
            with gr.Tab("LoRA"):
                loras = gr.HTML("", elem_id=f"{prefix}_lora_cards")
            with gr.Tab("Textual Inversion"):
                embeddings = gr.HTML("", elem_id=f"{prefix}_embedding_cards")
            with gr.Tab("Checkpoints"):
                gr.Markdown(
                    "Click a card to use that checkpoint (as choosing it in the dropdown above does; "
                    "it loads with the next job). Its family decides which LoRAs fit."
                )
                checkpoints = gr.HTML("", elem_id=f"{prefix}_checkpoint_cards")
                pick = gr.Textbox(visible="hidden", elem_id=f"{prefix}_checkpoint_pick")

    def render(data: dict[Any, Any]) -> tuple[str, str, str]:
        services.registry.refresh()
        cards = catalogue.cards(data.get(checkpoint))
        text = data.get(search) or ""
        chosen = str(data.get(checkpoint) or "")
        kinds = ("lora", "embedding", "checkpoint")
        return tuple(cards_html(cards, prefix, kind, text, selected=chosen) for kind in kinds)  # type: ignore[return-value]

    def choose(data: dict[Any, Any]) -> Any:
        return picked_checkpoint(services, str(data.get(pick) or ""), data.get(checkpoint))

    quiet: dict[str, Any] = {"show_progress": "hidden", "concurrency_limit": None}
    outputs = [loras, embeddings, checkpoints]
    for trigger in (accordion.expand, refresh.click, search.submit, search.input, checkpoint.change):
        trigger(render, inputs={search, checkpoint}, outputs=outputs, **quiet)
    # the dropdown's own change event then redraws the cards (LoRA families, the "in use" mark)
    pick.change(choose, inputs={pick, checkpoint}, outputs=checkpoint, **quiet)
    return ExtraNetworksPanel(
        loras=loras, embeddings=embeddings, checkpoints=checkpoints, checkpoint_pick=pick
    )
