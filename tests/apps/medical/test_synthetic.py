"""The phantom generator: valid DICOM read back with the right geometry, lesions per label, determinism."""

from __future__ import annotations

import csv
import hashlib
import warnings

import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from apps.medical.adapters import read_record, read_series
from apps.medical.synthetic import (
    LABELS,
    PATTERN_GIVEN_LABEL,
    PRESENTATION_GIVEN_LABEL,
    generate,
    make_case,
    sample_findings,
)
from core.errors import ConfigError

SHAPE = (12, 48, 48)
SEED = 5


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """One case per label."""
    out = tmp_path_factory.mktemp("synthetic")
    manifest = generate(out, len(LABELS), SEED, shape=SHAPE, labels=LABELS)
    with manifest.open(newline="") as handle:
        return out, list(csv.DictReader(handle))


def test_manifest_lists_every_case(dataset):
    out, rows = dataset
    assert [r["label"] for r in rows] == list(LABELS)
    assert list(rows[0]) == [
        "case_id",
        "series_dir",
        "record_file",
        "label",
        "pattern",
        "presentation",
        "lesion_voxels",
    ]
    for row in rows:
        assert (out / row["series_dir"]).is_dir() and (out / row["record_file"]).is_file()
        assert row["pattern"] in PATTERN_GIVEN_LABEL[row["label"]]


def test_files_are_valid_ct_dicom(dataset):
    out, rows = dataset
    files = sorted((out / rows[0]["series_dir"]).iterdir())
    assert len(files) == SHAPE[0]
    ds = pydicom.dcmread(files[0])  # no force: a real Part 10 file with preamble and meta
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.SOPClassUID == CTImageStorage and ds.Modality == "CT"
    assert ds.pixel_array.shape == SHAPE[1:] and ds.RescaleIntercept == -1024
    assert len({pydicom.dcmread(f).SOPInstanceUID for f in files}) == SHAPE[0]


def test_adapter_reads_the_series_back_with_the_right_geometry_and_hu(dataset):
    out, rows = dataset
    for index, row in enumerate(rows):
        case = make_case(index, SEED, label=row["label"], shape=SHAPE)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a clean series: no degraded-input warnings
            volume = read_series(out / row["series_dir"])
        assert volume.shape == SHAPE
        assert volume.spacing == pytest.approx(case.spacing)
        assert volume.origin == pytest.approx(case.origin, abs=1e-4)
        np.testing.assert_allclose(volume.direction, np.eye(3)[[2, 1, 0]])
        assert volume.is_uniform and volume.tilt_deg == 0.0
        np.testing.assert_array_equal(volume.padding_mask, np.broadcast_to(~case.inside_field, SHAPE))
        np.testing.assert_array_equal(volume.hu[:, case.inside_field], case.hu[:, case.inside_field])
        assert read_record(out / row["record_file"]) == case.record
        assert volume.patient_id == case.record.patient_id


def test_lesions_are_present_for_every_abnormal_label(dataset):
    _, rows = dataset
    for index, row in enumerate(rows):
        case = make_case(index, SEED, label=row["label"], shape=SHAPE)
        assert int(row["lesion_voxels"]) == int(case.lesion_mask.sum())
        if row["label"] == "normal":
            assert not case.lesion_mask.any()
            continue
        assert case.lesion_mask.any(), row
        # Lung is about -850 HU; every lesion (solid, ground glass, cavity wall, miliary dots) is denser.
        assert case.hu[case.lesion_mask].mean() > -750, row


def test_lungs_mediastinum_and_bone_have_their_densities():
    case = make_case(0, SEED, label="normal", shape=SHAPE)
    middle = case.hu[SHAPE[0] // 2]
    assert (middle < -700).mean() > 0.1  # lungs and outside air
    assert middle.max() > 300  # spine / ribs
    assert ((middle > -50) & (middle < 100)).mean() > 0.1  # soft tissue


def test_generation_is_deterministic_under_the_seed(tmp_path):
    def digest(folder):
        return {
            p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in folder.rglob("*")
            if p.is_file()
        }

    first = digest(generate(tmp_path / "a", 3, 11, shape=SHAPE).parent)
    second = digest(generate(tmp_path / "b", 3, 11, shape=SHAPE, jobs=2).parent)  # worker processes
    other = digest(generate(tmp_path / "c", 3, 12, shape=SHAPE).parent)
    assert first == second
    assert first["cases.csv"] == second["cases.csv"] and first != other


def test_each_ambiguous_image_pattern_belongs_to_several_labels():
    # The design that makes fusion necessary: the image alone cannot tell these labels apart.
    producers = {}
    for label, patterns in PATTERN_GIVEN_LABEL.items():
        for pattern in patterns:
            producers.setdefault(pattern, set()).add(label)
    assert producers["ground_glass"] >= {"pneumonia", "malignancy"}
    assert producers["solid_nodule"] >= {"benign_nodule", "malignancy"}
    assert producers["cavity"] >= {"pneumonia", "tuberculosis"}


def test_invalid_requests_are_config_errors(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(ConfigError, match="empty folder"):
        generate(tmp_path / "busy", 1, 0)
    with pytest.raises(ConfigError, match="one label per case"):
        generate(tmp_path / "new", 2, 0, labels=["normal"])
    with pytest.raises(ConfigError, match="expected one of normal"):
        make_case(0, 0, label="influenza")
    with pytest.raises(ConfigError, match="at least 1"):
        generate(tmp_path / "new", 0, 0)


def test_each_presentation_belongs_to_labels_that_the_image_separates():
    # The other half of the design: the record narrows the diagnosis to labels whose CT patterns differ.
    producers = {}
    for label, presentations in PRESENTATION_GIVEN_LABEL.items():
        for presentation in presentations:
            producers.setdefault(presentation, set()).add(label)
    for presentation, pair in (
        ("incidental", {"normal", "benign_nodule"}),
        ("acute_infection", {"normal", "pneumonia"}),
        ("constitutional", {"malignancy", "tuberculosis"}),
    ):
        assert producers[presentation] >= pair
        first, second = (PATTERN_GIVEN_LABEL[label] for label in sorted(pair))
        shared = sum(min(first[p], second.get(p, 0.0)) for p in first)  # 1 - total variation distance
        assert shared <= 0.15, (presentation, first, second)


def test_record_signs_follow_the_presentation_whatever_the_label():
    def fever_rate(label, presentation):
        findings = [sample_findings(i, 7, label=label) for i in range(400)]
        chosen = [f for f in findings if f.presentation == presentation]
        return np.mean([bool(f.record.history.get("fever")) for f in chosen]), len(chosen)

    normal_acute, n_normal = fever_rate("normal", "acute_infection")
    pneumonia_acute, n_pneumonia = fever_rate("pneumonia", "acute_infection")
    normal_well, _ = fever_rate("normal", "incidental")
    assert n_normal > 50 and n_pneumonia > 50
    assert normal_acute > 0.75 and pneumonia_acute > 0.75 and normal_well < 0.15
    assert abs(normal_acute - pneumonia_acute) < 0.15


def test_make_case_draws_the_findings_that_sample_findings_draws():
    for index, label in enumerate(("malignancy", None)):
        case = make_case(index, SEED, label=label, shape=SHAPE)
        findings = sample_findings(index, SEED, label=label)
        assert (case.label, case.pattern, case.presentation) == (
            findings.label,
            findings.pattern,
            findings.presentation,
        )
        assert case.record == findings.record


def test_the_lesion_sites_are_lung_the_heart_and_aorta_do_not_cover() -> None:
    # Lesions are placed inside the phantom's lung mask; before the organs were taken out of it, a fifth
    # of that mask was heart or aorta, where a solid nodule (~35 HU) is invisible.
    from apps.medical.synthetic import _anatomy, _grid

    for seed in range(3):
        hu, lung_mask, _ = _anatomy(_grid((32, 96, 96)), np.random.default_rng(seed))
        assert lung_mask.any()
        assert (hu[lung_mask] > -300).mean() < 0.02  # only the vessels are solid inside the lungs
