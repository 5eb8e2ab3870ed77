import unittest


class TestArithmetic(unittest.TestCase):
    def test_add(self):
        self.assertEqual(1 + 1, 2)

    def test_fails(self):
        self.assertEqual(1 + 1, 3)

    @unittest.skip("unittest skip")
    def test_skip(self):
        pass
