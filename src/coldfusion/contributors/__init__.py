"""The one contributor (contributor.py), the encodings of what it sends (encodings.py) and
where its head survives between rounds (heads.py): below the loop, the Flower ClientApp and
the service's `contribute-loop`, which drive it."""
