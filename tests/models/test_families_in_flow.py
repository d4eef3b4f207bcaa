"""Every family end to end through the Prefect flow: each model saved in its own format, loaded
the way users load it from a local folder and from S3 (moto), every row compared with the
family's own reference calls; the file metadata names the model and its preprocessing.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from clipbatch.config import build_config
from clipbatch.io.storage import get_fs
from clipbatch.sink.schema import METADATA_KEY
from clipbatch.synthetic import write_webdataset
from tests import model_fixtures as mf
from tests.conftest import upload_dir
from tests.helpers import read_table, tar_samples

pytestmark = pytest.mark.timeout(300)

WRITERS = {
    "open_clip": lambda d: mf.write_open_clip_dir(d, preprocess="longest"),
    "open_clip_siglip": mf.write_open_clip_siglip_dir,
    "hf_clip": mf.write_hf_clip_dir,
    "hf_siglip": mf.write_hf_siglip_dir,
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {family: writer(root / family) for family, writer in WRITERS.items()}


def model_name(family: str, location: str) -> str:
    return f"hf:{location}" if family.startswith("hf") else f"open_clip:local-dir:{location}"


class Reference:
    """The family's own calls on a model loaded without clipbatch."""

    def __init__(self, family: str, folder: Path) -> None:
        self.family = family
        if family.startswith("open_clip"):
            import open_clip

            self.model, self.preprocess = open_clip.create_model_from_pretrained(
                f"local-dir:{folder}"
            )
            self.tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
        else:
            import transformers

            self.model = transformers.AutoModel.from_pretrained(folder)
            self.processor = transformers.AutoProcessor.from_pretrained(folder)
        self.model.eval()

    def __call__(self, image: bytes, caption: str) -> tuple[np.ndarray, np.ndarray]:
        from PIL import Image

        img = Image.open(io.BytesIO(image))
        with torch.no_grad():
            if self.family.startswith("open_clip"):
                i = self.model.encode_image(self.preprocess(img)[None])
                t = self.model.encode_text(self.tokenizer([caption]))
            else:
                pixels = self.processor(images=[img], return_tensors="pt")
                text = self.processor(
                    text=[caption], padding="max_length", truncation=True, return_tensors="pt"
                )
                i = _tensor(self.model.get_image_features(**pixels))
                t = _tensor(self.model.get_text_features(**text))
        return i.numpy()[0], t.numpy()[0]


def _tensor(out: object) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize("family", list(WRITERS))
def test_flow_with_every_family_equals_its_reference(
    prefect_harness: None,
    model_dirs: dict[str, Path],
    family: str,
    where: str,
    tmp_path: Path,
    s3_bucket: str,
    s3_endpoint: str,
) -> None:
    from clipbatch_flows.embed import embed_dataset

    folder = model_dirs[family]
    location = str(folder)
    if where == "s3":
        location = upload_dir(folder, s3_bucket, f"models/{family}", s3_endpoint) + "/"
    tars = write_webdataset(tmp_path / "data", shards=1, per_shard=6, seed=11, size=72)
    source = upload_dir(tmp_path / "data", s3_bucket, "data", s3_endpoint)
    storage = {"endpoint_url": s3_endpoint}
    dest = f"s3://{s3_bucket}/emb/{family}-{where}"
    config = build_config(
        {
            "source": {"url": source, "storage": storage},
            "sink": {"url": dest, "storage": storage, "dtype": "float32"},
            "model": {"name": model_name(family, location), "storage": storage},
            "runtime": {"device": "cpu", "batch_size": 4, "task_retries": 0},
        }
    )
    summary = embed_dataset(config)
    assert summary["shards_committed"] == 1 and summary["shards_failed"] == 0

    table, _ = read_table(dest, s3_endpoint)
    samples = tar_samples(tars)
    assert table.num_rows == len(samples) == 6
    reference = Reference(family, folder)
    for row in table.to_pylist():
        assert row["status"] == "ok", row["error"]
        sample = samples[row["key"]]
        ref_img, ref_txt = reference(sample["jpg"], sample["txt"].decode())
        assert mf.cosines([row["image_embedding"]], [ref_img])[0] >= 0.9999, row["key"]
        assert mf.cosines([row["text_embedding"]], [ref_txt])[0] >= 0.9999, row["key"]

    fs, path = get_fs(dest, config.sink.storage)
    meta = json.loads(
        pq.read_metadata(f"{path}/00000.parquet", filesystem=fs).metadata[METADATA_KEY]
    )
    model = meta["model"]
    assert model["family"] == ("hf" if family.startswith("hf") else "open_clip")
    assert model["name"] == config.model.name and len(model["config_sha256"]) == 64
    siglip = family.endswith("siglip")
    assert model["context_length"] == (64 if siglip else 77)
    assert model["text"]["padding"] == ("max_length" if siglip else "longest")
    pre = meta["preprocessing"]
    assert pre["mean"] == ([0.5, 0.5, 0.5] if siglip else list(reference_mean(family)))
    resize_modes = {
        "open_clip": "longest",
        "open_clip_siglip": "squash",
        "hf_clip": "shortest",
        "hf_siglip": "squash",
    }
    assert pre["image"]["resize_mode"] == resize_modes[family]

    # search and inspect work from the table alone, with the model its metadata names.
    from clipbatch.config import StorageOptions
    from clipbatch.query.search import TextQueryEncoder, search
    from clipbatch.query.validate import validate
    from clipbatch.tables.table import open_table

    storage_options = StorageOptions(endpoint_url=s3_endpoint)
    output = open_table(dest, storage_options)
    report = validate(output)
    assert report.ok, report.problems
    rows = table.to_pylist()
    caption = rows[0]["caption"]
    # The query vector is the family's own text embedding of the caption (its reference
    # call), not the table's stored vector, which the same encoder path wrote.
    _, ref_query = reference(samples[rows[0]["key"]]["jpg"], caption)
    query = TextQueryEncoder(output, storage=storage_options)([caption])
    assert mf.cosines(query, [ref_query])[0] >= 0.9999
    # Search ranks the stored image vectors by cosine with that reference query vector.
    [hits] = search(output, [caption], k=3, storage=storage_options)
    images = np.asarray([r["image_embedding"] for r in rows], np.float64)
    expected = mf.cosines(images, np.repeat(ref_query[None, :], len(rows), axis=0))
    by_key = dict(zip([r["key"] for r in rows], expected, strict=True))
    top = np.sort(expected)[::-1][:3]
    assert len(hits) == 3
    for hit, want in zip(hits, top, strict=True):
        assert abs(hit.score - want) < 1e-3, (hit.key, hit.score, want)  # the k best scores
        assert abs(by_key[hit.key] - hit.score) < 1e-3, hit.key  # each hit's own score


def reference_mean(family: str) -> tuple[float, ...]:
    if family == "open_clip":
        return tuple(mf.OPEN_CLIP_PREPROCESS["longest"]["mean"])
    from clipbatch.preprocess.resize import CLIP_MEAN

    return CLIP_MEAN
