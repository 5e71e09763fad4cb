# The local ModelServer image: the `tritonserver` that the PyPI wheel nvidia-pytriton carries
# (Triton 2.51, python backend, runs on CPU) with kubetune's python-backend model's libraries
# (torch, transformers) and the kubetune package for the fetch init container. It stands where
# real clusters run images/triton/Dockerfile (NVIDIA's image): no registry is reachable here.
#
# Built by kubetune.devcluster.images.triton_image() from the repository root, FROM the local ML
# base (images/ml: requirements.lock's packages in /usr/local, shared with the trainer image):
#
#   buildah bud -f images/triton/local.Dockerfile --build-arg BASE_IMAGE=kubetune.local/ml:KEY .
#
# What kubetune.serving.local does for a host process is done here once, at build time, so that
# nothing is written to the image at run time (the pods run as uid 1000 on a read-only root):
# - the python backend stub for this Python (3.11) goes into the wheel's backends/python/, where
#   its RPATH finds the wheel's libraries; it links libpython3.11.so, Debian's libpython3.11;
# - numpy 1.26 for the stub in a folder of its own: Triton 2.51's python backend corrupts string
#   tensors under numpy 2, which the training stack needs (docs/serving.md);
# - the stub embeds Python in isolated mode (PYTHONPATH ignored) and finds its prefix through
#   `python3` on PATH: /opt/kubetune/stub/bin/python3 with a pyvenv.cfg and one .pth file that
#   lists the numpy folder, then the system's packages (and sets a UTF-8 locale);
# - `tritonserver` on PATH is a wrapper that sets the library path, puts the stub's `python3`
#   first on PATH and names the backends folder, then runs the wheel's server with the pod's
#   arguments (the operator's container command is `tritonserver`, as in NVIDIA's image).
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends libpython3.11 \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log

RUN --mount=type=cache,target=/var/cache/pip \
    export PIP_CACHE_DIR=/var/cache/pip \
    && pip="python3 $(echo /usr/share/python-wheels/pip-*.whl)/pip" \
    && $pip install --no-deps --target /opt/kubetune/stub-numpy numpy==1.26.4 \
    && triton=$(python3 -c "import pytriton, pathlib; print(pathlib.Path(pytriton.__file__).parent / 'tritonserver')") \
    && libs=$(dirname $(dirname "$triton"))/nvidia_pytriton.libs \
    && test -x "$triton/bin/tritonserver" && test -d "$libs" \
    && install -m 0755 "$triton/python_backend_stubs/3.11/triton_python_backend_stub" \
         "$triton/backends/python/triton_python_backend_stub" \
    && mkdir -p /opt/kubetune/stub/bin /opt/kubetune/stub/lib/python3.11/site-packages \
    && ln -s /usr/bin/python3.11 /opt/kubetune/stub/bin/python3 \
    && printf 'home = /usr/bin\ninclude-system-site-packages = false\nversion = %s\n' \
         "$(python3 -c 'import platform; print(platform.python_version())')" \
         > /opt/kubetune/stub/pyvenv.cfg \
    && python3 -c "import site, sys; print('\n'.join(['/opt/kubetune/stub-numpy', *site.getsitepackages()]))" \
         > /opt/kubetune/stub/lib/python3.11/site-packages/kubetune-stub.pth \
    && echo "import locale; locale.setlocale(locale.LC_CTYPE, 'C.UTF-8')  # kubetune: UTF-8 text I/O" \
         >> /opt/kubetune/stub/lib/python3.11/site-packages/kubetune-stub.pth \
    && printf '%s\n' '#!/bin/sh' \
         '# The wheel'"'"'s tritonserver with its libraries, backends and python backend stub.' \
         "export LD_LIBRARY_PATH=$libs\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" \
         'export PATH=/opt/kubetune/stub/bin:$PATH' \
         "exec $triton/bin/tritonserver --backend-directory=$triton/backends --allow-gpu-metrics=false \"\$@\"" \
         > /usr/local/bin/tritonserver \
    && chmod 0755 /usr/local/bin/tritonserver \
    && PATH=/opt/kubetune/stub/bin:$PATH LD_LIBRARY_PATH=$libs \
         ldd "$triton/backends/python/triton_python_backend_stub" "$triton/bin/tritonserver" \
         | (! grep "not found") \
    && /opt/kubetune/stub/bin/python3 -I -B -c "import numpy, torch, transformers; assert numpy.__version__ == '1.26.4', numpy.__version__"

# The fetcher (`python -m kubetune.serving.fetch`): kubetune alone in a venv that sees the
# system's packages (its dependencies are the ML base's, from requirements.lock).
COPY pyproject.toml README.md /tmp/src/
COPY operator /tmp/src/operator
RUN --mount=type=cache,target=/var/cache/pip \
    export PIP_CACHE_DIR=/var/cache/pip \
    && python3 -m venv --system-site-packages --without-pip /opt/kubetune/venv \
    && python3 $(echo /usr/share/python-wheels/pip-*.whl)/pip --python /opt/kubetune/venv/bin/python \
         install --no-deps --no-compile /tmp/src \
    && rm -rf /tmp/src \
    && /opt/kubetune/venv/bin/python -c "import kubetune.serving.fetch, huggingface_hub, boto3"

# uid/gid 1000, the pods' runAsUser (builders/common.py). HOME and the caches point at /tmp, the
# pods' emptyDir: the root file system is read-only.
RUN groupadd --gid 1000 kubetune \
    && useradd --uid 1000 --gid 1000 --no-create-home --home-dir /tmp \
       --shell /usr/sbin/nologin kubetune
ENV PATH=/opt/kubetune/venv/bin:$PATH HOME=/tmp XDG_CACHE_HOME=/tmp/cache HF_HOME=/tmp/huggingface
USER 1000:1000
WORKDIR /tmp

ENTRYPOINT ["tritonserver"]
CMD ["--model-repository=/kubetune/models"]
