{"alg": "ed25519", "key_id": "01f9e704687a4faf", "sig": "kwhp61TFJuCOyknBvTg7xz9Ul0bQLeGIUpeNnF2/TKfP6FZuQZRnQu6PsY+tXuunlzUXKS7FW1NcuwaMcQV0BA=="}
