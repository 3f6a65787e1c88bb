"""Data shipped with kka_ray: the trained default drawer (kka-pixel-drawer: UNet + scheduler, no text encoder)."""
