"""Medical vertical: CT-plus-record diagnosis (DICOM and record adapters, phantom generator, model, review UI)."""
