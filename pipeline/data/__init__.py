"""Identity data: the SynthFaces generator and the identity-source loader."""
