"""mapa-vae."""
