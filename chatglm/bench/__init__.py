# Benchmarks: decode/prefill speed (speed), quantization accuracy, the serving benchmark (serve).
