{"alg": "ed25519", "key_id": "01f9e704687a4faf", "sig": "VEn4y+wBwpRZvOm8XCdMzEU1Wcy31UJejY17PEBdAj9D2834pKH9/sH2VsahU2lYRQWHPlLHKqG4mV+501lbAw=="}
