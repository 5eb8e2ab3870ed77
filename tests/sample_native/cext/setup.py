from setuptools import Extension, setup

setup(ext_modules=[Extension("fastmath._speed", ["src/fastmath/_speed.c"])])
