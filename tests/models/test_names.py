"""The model-name grammar: every form, and the ambiguous or invalid ones with clear errors."""

from __future__ import annotations

import pytest

from clipbatch.errors import ConfigError
from clipbatch.models.names import (
    ARCH_TAG,
    BUILTIN,
    FILE,
    FOLDER,
    HUB,
    LOCAL_DIR,
    parse_model_name,
)


@pytest.mark.parametrize(
    ("name", "family", "form", "value", "canonical"),
    [
        ("tiny", "openai", BUILTIN, "tiny", "tiny"),
        ("ViT-B/32", "openai", BUILTIN, "ViT-B/32", "ViT-B/32"),
        ("openai:ViT-B/32", "openai", BUILTIN, "ViT-B/32", "ViT-B/32"),
        ("openai:tiny", "openai", BUILTIN, "tiny", "tiny"),
        ("ViT-L/14@336px", "openai", BUILTIN, "ViT-L/14@336px", "ViT-L/14@336px"),
        ("./ckpt/model.pt", "openai", BUILTIN, "./ckpt/model.pt", "./ckpt/model.pt"),
        ("/abs/a:b.pt", "openai", BUILTIN, "/abs/a:b.pt", "/abs/a:b.pt"),
        ("s3://bucket/ckpt.pt", "openai", FILE, "s3://bucket/ckpt.pt", "s3://bucket/ckpt.pt"),
        ("openai:s3://b/c.pt", "openai", FILE, "s3://b/c.pt", "s3://b/c.pt"),
        ("file:///x/c.pt", "openai", FILE, "file:///x/c.pt", "file:///x/c.pt"),
        (
            "open_clip:ViT-H-14:laion2b_s32b_b79k",
            "open_clip",
            ARCH_TAG,
            "ViT-H-14:laion2b_s32b_b79k",
            "open_clip:ViT-H-14:laion2b_s32b_b79k",
        ),
        ("open_clip:local-dir:/m/oc", "open_clip", LOCAL_DIR, "/m/oc", "open_clip:local-dir:/m/oc"),
        ("open_clip:local-dir:rel/oc", "open_clip", LOCAL_DIR, "rel/oc", None),
        ("open_clip:local-dir:s3://b/oc/", "open_clip", LOCAL_DIR, "s3://b/oc/", None),
        ("open_clip:hf-hub:laion/CLIP-ViT-g-14", "open_clip", HUB, "laion/CLIP-ViT-g-14", None),
        ("hf:google/siglip-base-patch16-224", "hf", HUB, "google/siglip-base-patch16-224", None),
        ("hf:openai/clip-vit-base-patch32@main", "hf", HUB, "openai/clip-vit-base-patch32", None),
        ("hf:./models/siglip", "hf", FOLDER, "./models/siglip", None),
        ("hf:../siglip", "hf", FOLDER, "../siglip", None),
        ("hf:/abs/siglip", "hf", FOLDER, "/abs/siglip", None),
        ("hf:s3://bucket/siglip/", "hf", FOLDER, "s3://bucket/siglip/", None),
        ("hf:gs://bucket/org/name", "hf", FOLDER, "gs://bucket/org/name", None),
    ],
)
def test_every_form_parses(
    name: str, family: str, form: str, value: str, canonical: str | None
) -> None:
    parsed = parse_model_name(name)
    assert (parsed.family, parsed.form, parsed.value) == (family, form, value)
    assert parsed.canonical == (canonical or name)


def test_parts_of_each_form() -> None:
    tagged = parse_model_name("open_clip:ViT-B-16-SigLIP2:webli")
    assert (tagged.arch, tagged.tag) == ("ViT-B-16-SigLIP2", "webli")
    hub = parse_model_name("hf:org/name@v1.0")
    assert (hub.arch, hub.revision) == ("org/name", "v1.0")
    assert parse_model_name("hf:org/name").revision is None
    assert parse_model_name("open_clip:hf-hub:org/repo").arch == "hf-hub:org/repo"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("open_clip:ViT-H-14", "needs a pretrained tag"),
        ("open_clip:ViT-H-14:", "needs a pretrained tag"),
        ("open_clip::laion2b", "architecture must follow"),
        ("open_clip:ViT-H-14:laion2b:extra", "neither holds a colon"),
        ("open_clip:local-dir:", "folder path or URL must follow"),
        ("open_clip:hf-hub:noslash", "hub repo ORG/REPO"),
        ("open_clip:hf-hub:", "hub repo ORG/REPO"),
        ("hf:", "hub id or folder must follow"),
        ("hf:just-a-name", "hub id ORG/NAME"),  # neither a hub id nor a folder path
        ("hf:models/siglip/extra", "hub id ORG/NAME"),  # a relative path must start with ./
        ("hf:org/name@", "hub id ORG/NAME"),
        ("hf:~/models/siglip", "hub id ORG/NAME"),
        ("hf_clip:openai/clip-vit-base-patch32", "did you mean hf:"),
        ("openclip:ViT-B-32:openai", "did you mean open_clip:"),
        ("local-dir:/x", "did you mean open_clip:local-dir:"),
        ("mymodel:v1.pt", "./mymodel:v1.pt"),
        ("openai:open_clip:ViT-B-32:openai", "openai: takes a clip name"),
        ("openai:", "nothing after openai:"),
        ("", "empty model name"),
    ],
)
def test_invalid_and_ambiguous_names_say_what_to_write(name: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        parse_model_name(name)


def test_missing_tag_lists_the_architectures_tags() -> None:
    # The tags come from open_clip's registry (the [open_clip] extra, part of [dev]).
    with pytest.raises(ConfigError, match="tags for ViT-B-32: .*laion2b_s34b_b79k"):
        parse_model_name("open_clip:ViT-B-32")


def test_the_openai_names_known_without_torch_are_clips_own() -> None:
    import clip

    from clipbatch.models.names import OPENAI_MODELS

    assert list(OPENAI_MODELS) == clip.available_models()


def test_list_models_names_every_family_in_the_grammar() -> None:
    from clipbatch.models.catalog import list_models
    from clipbatch.models.names import parse_model_name

    names = list_models()
    assert "tiny" in names and "openai:ViT-B/32" in names
    assert any(n.startswith("open_clip:ViT-B-32:") for n in names)
    assert any(n.startswith("hf:") for n in names)
    for name in names:
        parse_model_name(name)  # every listed name parses
