"""Compatibility shim: the procedural textures moved to cdistill.concepts.textures."""

from cdistill.concepts.textures import NUM_TEXTURES, make_textures

__all__ = ["NUM_TEXTURES", "make_textures"]
