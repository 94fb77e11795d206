"""Infrastructure every layer uses: errors, failpoints, devices and threads, progress, config files, names."""
